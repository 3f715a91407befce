"""bench/tail_bounds.py on one kernel instance: the SASS count, the residency and the three
bounds come out sane (skips where nvcc or cuobjdump is absent); its model, without them: the
committed tables from their committed counts, and the bounds by hand."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import sass_bounds as sb  # noqa: E402
import tail_bounds as tb  # noqa: E402

needs_tools = pytest.mark.skipif(
    sb.find_tool("nvcc") is None or sb.find_tool("cuobjdump") is None,
    reason="needs nvcc and cuobjdump")
SHAPES = {sh.name: sh for sh in sb.SHAPES}
GPUS = {gpu.name: gpu for gpu in sb.GPUS}


@needs_tools
def test_one_instance(tmp_path):
    result = tb.analyse((SHAPES["SmolLM2"],), bits=4, workdir=str(tmp_path))
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


@pytest.mark.parametrize("bits", [2, 4])
def test_committed_rows_are_the_models(bits):
    """The committed tables are predict()'s rows from their committed counts: the model has not
    drifted from its results."""
    path = os.path.join(sb.ROOT, "bench", "results", f"tail_bounds_int{bits}.json")
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    for row in result["rows"]:
        sh = SHAPES[row["shape"]]
        count = result["counts"][
            f"lowbit_tail_kernel<{sh.d},{sb.group_slice_width(sh.hq // sh.hkv)},{bits}>"]
        assert tb.predict(sh, row["tokens"], row["batch"], GPUS[row["gpu"]], count, bits) == row


def test_bounds_by_hand():
    """predict() for Llama-3-8B 32K x 8, 2 bits, on an H200 (4.3 TB/s, 132 SMs of 4 issues a
    cycle at 1.98 GHz), 2 blocks an SM: 8 chunks of 4096 keys for each of the 8 x 8 KV heads are
    512 blocks, so the busiest SM runs ceil(512 / 132) = 4 of them, 16384 keys at 10 issues and
    0.5 mma a key; every KV head reads, a key, 4 float32 scores, 128 x 2 bits of codes and 4 B
    of meta."""
    count = {"blocks_per_sm": 2, "per_key": 10.0, "mma_per_key": 0.5}
    r = tb.predict(SHAPES["Llama-3-8B"], 32768, 8, GPUS["H200"], count, 2)
    assert (r["chunk"], r["blocks"], r["bytes_per_key"]) == (4096, 512, 4 * 4 + 128 * 2 // 8 + 4)
    assert r["issue_us"] == round(4 * 4096 * 10 / (4 * 1.98e9) * 1e6, 1) == 20.7
    assert r["tensor_us"] == round(4 * 4096 * 0.5 / (0.5 * 1.98e9) * 1e6, 1) == 8.3
    assert r["bytes_us"] == round(8 * 8 * 32768 * 52 / 4.3e12 * 1e6, 1) == 25.4
