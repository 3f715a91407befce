"""The README's Python examples run as they are written, in order, as a newcomer would paste them:
the ops and their reference check (on CUDA where a GPU is, else on the CPU, as the README says),
KCache in a transformers model, and the decoder with a cache built by hand."""
import contextlib
import io
import re
from pathlib import Path

import pytest

from model_helpers import requires_embedded_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    """The README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def run_blocks(blocks, first):
    """Runs ``blocks`` in one namespace (a later block uses an earlier one's names), each compiled
    under its README number -> (the namespace, what they printed)."""
    names, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for i, block in enumerate(blocks, first):
            exec(compile(block, f"README.md python block {i}", "exec"), names)  # noqa: S102
    return names, printed.getvalue()


def test_the_readme_has_the_examples_this_file_runs():
    blocks = python_blocks()
    assert len(blocks) == 4, "a README example was added or removed: run it here too"
    assert "kcache_ops.qk_topn" in blocks[0] and "reference as R" in blocks[1]
    assert "KCacheCache" in blocks[2] and "make_cache" in blocks[3]


def test_ops_example_and_its_reference_check():
    """q·Kᵀ top-64 and the V gather on 4 × 32K keys, then the reference comparison the README
    shows (its assert_close calls are the test)."""
    names, _ = run_blocks(python_blocks()[:2], 1)
    assert tuple(names["out"].shape) == (4, 32, 128)


@requires_embedded_model
# the README's past_key_values= works on every tested transformers; from 5.24 it warns (as the
# README says), where cache= is the new spelling
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_kcache_in_a_transformers_model_example():
    """The transformers example generates both prompts' continuations with a KCacheCache."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    names, printed = run_blocks(python_blocks()[2:3], 3)
    texts = names["tok"].batch_decode(names["out"], skip_special_tokens=True)
    assert printed.strip() == str(texts)
    assert texts[0].startswith("The capital of France is Paris")
    assert texts[1].startswith("Water boils at")
    assert names["cache"].host_bytes() > 0  # V went to host RAM


@requires_embedded_model
def test_decoder_with_a_cache_example():
    """The embedded model's prefill and one decode step through a KCache built by make_cache."""
    names, _ = run_blocks(python_blocks()[3:4], 4)
    assert tuple(names["logits"].shape) == (2, names["model"].config.vocab_size)
    assert names["cache"].seq_lens.tolist() == [len(names["tok"].encode(p)) + 1 for p in
                                                ("The capital of France is", "Water boils at")]
