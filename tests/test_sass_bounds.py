"""bench/sass_bounds.py on one kernel instance: the SASS counts and the two bounds come out sane.
Skips where nvcc or cuobjdump is absent."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import sass_bounds as sb  # noqa: E402

pytestmark = pytest.mark.skipif(sb.find_tool("nvcc") is None or sb.find_tool("cuobjdump") is None,
                                reason="needs nvcc and cuobjdump")


def test_one_instance(tmp_path):
    smol = next(s for s in sb.SHAPES if s.name == "SmolLM2")
    result = sb.analyse((smol,), workdir=str(tmp_path))
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
