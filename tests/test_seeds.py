"""KCACHE_OPS_TEST_SEED (conftest.py): 0 keeps CI's inputs, another value draws other torch inputs,
Hypothesis examples and emulator schedule seeds, the same again for the same value."""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import TEST_SEED, seed_of
from cuda_emu import emu

PROBE = os.environ.get("KCACHE_OPS_SEED_PROBE") == "1"  # set by the subprocess runs below
DRAWN = []  # [x]: the Hypothesis probe's examples, in order


@pytest.mark.skipif(not PROBE, reason="the probe of test_other_seeds_draw_other_inputs")
@settings(max_examples=4, database=None)
@given(st.integers(0, 10 ** 9))
def test_probe_examples(x):
    DRAWN.append(x)


@pytest.mark.skipif(not PROBE, reason="the probe of test_other_seeds_draw_other_inputs")
def test_probe_report():
    print(f"PROBE {DRAWN} {torch.rand(3).tolist()} {emu.SEED_SHIFT}")


def probe(seed):
    """The probe's draws in a pytest run under KCACHE_OPS_TEST_SEED=``seed`` -> its PROBE line."""
    env = dict(os.environ, KCACHE_OPS_SEED_PROBE="1", KCACHE_OPS_TEST_SEED=seed)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          f"{Path(__file__).name}::test_probe_examples",
                          f"{Path(__file__).name}::test_probe_report"],
                         cwd=Path(__file__).parent, env=env, capture_output=True, text=True,
                         timeout=300)
    lines = [line for line in res.stdout.splitlines() if "PROBE" in line]
    assert res.returncode == 0 and len(lines) == 1, res.stdout[-2000:] + res.stderr[-2000:]
    return lines[0][lines[0].index("PROBE"):]


def test_ci_seeds_are_the_crc_of_the_test_id():
    if TEST_SEED:
        pytest.skip("this run has KCACHE_OPS_TEST_SEED set")
    name = "test_x.py::test_y[cpu]"
    assert seed_of(name) == zlib.crc32(name.encode())
    assert emu.SEED_SHIFT == 0


def test_other_seeds_draw_other_inputs():
    """Each value draws the same again; 0, 1 and 2 draw three different sets of examples, torch
    inputs and schedule shifts."""
    runs = {seed: probe(seed) for seed in ("0", "1", "2")}
    assert probe("1") == runs["1"]
    assert len(set(runs.values())) == 3
    examples = [run.split("]")[0] for run in runs.values()]
    tensors = [run.split("]")[1] for run in runs.values()]
    assert len(set(examples)) == 3 and len(set(tensors)) == 3
    assert [run.split()[-1] for run in runs.values()] == ["0", "1000", "2000"]


@pytest.mark.parametrize("value", ["-1", "x", ""])
def test_a_bad_value_is_refused(value):
    env = dict(os.environ, KCACHE_OPS_TEST_SEED=value)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--co", Path(__file__).name], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert f"KCACHE_OPS_TEST_SEED must be a non-negative integer, got {value!r}" in (
        res.stdout + res.stderr)
