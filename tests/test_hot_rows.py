"""The hot-rows prototype of bench/hot_rows.py (issue 12, item 2): its selection is the hot rows
(the first sinks and the last window positions) plus the top N of the other rows by exact score,
without repeats, and it leaves N host rows per head."""
import math
import pathlib
import sys

import torch

from kcache_ops import reference
from kcache_ops.caches import KCacheOptions
from kcache_ops.model.config import LlamaConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from hot_rows import HotRowsKCache  # noqa: E402

HQ, HKV, D = 4, 2, 64


def test_select_is_hot_rows_plus_the_top_n_cold_rows():
    config = LlamaConfig(vocab_size=16, hidden_size=HQ * D, intermediate_size=32, num_layers=1,
                         num_heads=HQ, num_kv_heads=HKV, head_dim=D)
    sinks, window, n = 2, 3, 4
    lens = torch.tensor([40, 6, 1], dtype=torch.int32)  # [B]; short ones overlap sinks/window
    cache = HotRowsKCache(config, 3, 48, "cpu", torch.float32, KCacheOptions(topn=n), sinks,
                          window)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, HQ, D, generator=gen)  # [B, Hq, D]
    k = torch.randn(3, HKV, 48, D, generator=gen)  # [B, Hkv, S, D]
    scores, indices, lse = cache.select(q, k, lens)  # [B, Hq, n + 5] x2, [B, Hq]
    s, want_lse = reference.qk_scores(q, k, lens)  # [B, Hq, S]
    torch.testing.assert_close(lse, want_lse)
    for b, length in enumerate(lens.tolist()):
        hot = {j for j in range(length) if j < sinks or j >= length - window}
        cold = [j for j in range(length) if j not in hot]
        for h in range(HQ):
            top = sorted(cold, key=lambda j: -s[b, h, j].item())[:n]
            got = [i for i in indices[b, h].tolist() if i >= 0]
            assert len(got) == len(set(got)) and set(got) == hot | set(top), (b, h)
            for slot, i in enumerate(indices[b, h].tolist()):
                if i >= 0:
                    assert math.isclose(scores[b, h, slot].item(), s[b, h, i].item(),
                                        rel_tol=1e-4, abs_tol=1e-4)
                else:
                    assert scores[b, h, slot] == float("-inf")
            assert sum(i >= 0 for i in indices[b, h, :n].tolist()) == min(n, len(cold))


def test_report_shows_the_prototype(tmp_path):
    """REPORT.md gets a section of bench/results/hot_rows.json where it is present."""
    import json

    from kcache_ops import report
    rows = [{"label": "dense", "dppl": {"short": 0.0, "long": 0.0}},
            {"label": "N=8 tail=int2 + sinks 4 + window 60", "dppl": {"short": 0.75, "long": 0.04}}]
    (tmp_path / "hot_rows.json").write_text(json.dumps({
        "machine": {"cpu": "x", "cores": 1, "torch": "2", "device": "cpu"}, "sinks": 4,
        "window": 60, "rows": rows}))
    report.write(str(tmp_path))
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Hot rows next to the tail" in text
    assert "| N=8 tail=int2 + sinks 4 + window 60 | +0.75% | +0.04% |" in text
