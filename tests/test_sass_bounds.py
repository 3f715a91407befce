"""bench/sass_bounds.py on one kernel instance: the SASS counts and the two bounds come out sane
(skips where nvcc or cuobjdump is absent); its model, without them: the committed tables from
their committed counts, and the bounds by hand."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import sass_bounds as sb  # noqa: E402

needs_tools = pytest.mark.skipif(
    sb.find_tool("nvcc") is None or sb.find_tool("cuobjdump") is None,
    reason="needs nvcc and cuobjdump")
SHAPES = {sh.name: sh for sh in sb.SHAPES}
GPUS = {gpu.name: gpu for gpu in sb.GPUS}


@needs_tools
def test_one_instance(tmp_path):
    result = sb.analyse((SHAPES["SmolLM2"],), workdir=str(tmp_path))
    (name,) = [n for n in result["counts"] if n.startswith("qk_scores_kernel")]
    c = result["counts"][name]
    assert c["keys_per_warp_iter"] == sb.SCORE_UNROLL * 4  # D 64 bf16: 8 lanes per key
    assert 5 < c["per_key"] < 500 and 16 < c["regs"] <= 255
    sel = result["counts"]["qk_select_kernel"]
    assert 0 < sel["passes_per_float"] < 50 and 0 < sel["mass_per_float"] < 50
    # a pass over keys the block wrote transforms and bounds-tests none of them
    assert sel["passes_per_float"] < sel["score_row_passes_per_float"] < 50
    assert len(result["rows"]) == len(sb.LENGTHS) * len(sb.GPUS)
    for r in result["rows"]:
        assert r["score_issue_us"] > 0 and r["score_bytes_us"] > r["k_floor_us"] > 0
    assert "| H200 | SmolLM2 | 128K × 1 |" in sb.markdown(result, "test")


@pytest.mark.parametrize("label", ["merge_tree", "select_keys"])
def test_committed_rows_are_the_models(label):
    """The committed tables of the kernels as they are now (merge_tree, then select_keys) are
    predict()'s rows from their committed counts: the model has not drifted from its results."""
    path = os.path.join(sb.ROOT, "bench", "results", f"sass_bounds_{label}.json")
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    for row in result["rows"]:
        sh = SHAPES[row["shape"]]
        gs = sb.group_slice_width(sh.hq // sh.hkv)
        score = result["counts"][f"qk_scores_kernel<{sh.ctype},{sh.d},{gs}>"]
        assert sb.predict(sh, row["tokens"], row["batch"], GPUS[row["gpu"]], score,
                          result["counts"]["qk_select_kernel"]) == row


def test_bounds_by_hand():
    """predict() on an H200 (4.3 TB/s, 132 SMs of 4 issues a cycle at 1.98 GHz) with round counts.
    Llama-3-8B 32K x 8: the score pass moves K (8 KV heads of bf16 rows of 128) and writes a
    float32 score per query head (32) and key; the staged select reads those scores once. SmolLM2
    8K x 1: the 3 KV heads' rows of 8192 keys rank in 4 slices of 2048, each one block's, so the
    select takes at least 2048 keys x (2 passes + 3 heads x 1 mass) issues at 4 a cycle, though the
    132 SMs would issue the whole 3 x 8192 x 5 in 0.1 µs."""
    score = {"regs": 64, "per_key": 10.0, "loop_insns": 80}
    select = {"passes_per_float": 2.0, "mass_per_float": 1.0}
    r = sb.predict(SHAPES["Llama-3-8B"], 32768, 8, GPUS["H200"], score, select)
    k = 8 * 8 * 32768 * 128 * 2  # bytes of K: batch x KV heads x keys x D x bf16
    scratch = 8 * 32 * 32768 * 4  # bytes of the scores: batch x query heads x keys x float32
    assert r["k_floor_us"] == round(k / 4.3e12 * 1e6, 1) == 124.9
    assert r["score_bytes_us"] == round((k + scratch) / 4.3e12 * 1e6, 1) == 132.7
    assert r["select_staged"] and r["select_bytes_us"] == round(scratch / 4.3e12 * 1e6, 1) == 7.8
    r = sb.predict(SHAPES["SmolLM2"], 8192, 1, GPUS["H200"], score, select)
    assert r["select_slices"] == 4
    assert r["select_issue_us"] == round(2048 * (2 + 3) / (4 * 1.98e9) * 1e6, 1) == 1.3
