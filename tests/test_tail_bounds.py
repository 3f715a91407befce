"""bench/tail_bounds.py on one kernel instance: the SASS count, the residency and the three
bounds come out sane. Skips where nvcc or cuobjdump is absent."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import sass_bounds as sb  # noqa: E402
import tail_bounds as tb  # noqa: E402

pytestmark = pytest.mark.skipif(sb.find_tool("nvcc") is None or sb.find_tool("cuobjdump") is None,
                                reason="needs nvcc and cuobjdump")


def test_one_instance(tmp_path):
    smol = next(s for s in sb.SHAPES if s.name == "SmolLM2")
    result = tb.analyse((smol,), bits=4, workdir=str(tmp_path))
    (c,) = result["counts"].values()
    assert c["keys_per_warp_iter"] == 32  # D 64, 4 bits: 4 key columns of 8 one-word keys
    assert c["mma_per_key"] == 64 // 16 * 2 / 8  # 4 row tiles, two tf32 parts, 8 keys a k-step
    assert 5 < c["per_key"] < 500 and 16 < c["regs"] <= 255 and c["blocks_per_sm"] >= 1
    assert len(result["rows"]) == len(sb.LENGTHS) * len(sb.GPUS)
    for r in result["rows"]:
        assert r["bytes_per_key"] == 3 * 4 + 64 * 4 // 8 + 4  # G scores, codes, meta
        assert r["issue_us"] > 0 and r["tensor_us"] > 0 and r["bytes_us"] > 0
        assert 0 < r["waves"] <= 1
        assert r["chunk"] % tb.TAIL_CHUNK_STEP == 0 and r["chunk"] <= tb.TAIL_MAX_CHUNK
    assert "| H200 | SmolLM2 | 128K × 1 | 4 |" in tb.markdown(result)
