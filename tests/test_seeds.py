"""KCACHE_OPS_TEST_SEED (conftest.py): 0 keeps CI's inputs, another value draws other torch inputs,
Hypothesis examples and emulator schedule seeds, the same again for the same value."""
import os
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import DEVICES, run_pytest
from cuda_emu import emu

PROBE = os.environ.get("KCACHE_OPS_SEED_PROBE") == "1"  # set by the subprocess runs below
DRAWN = []  # [x]: the Hypothesis probe's examples, in order

# the nested pytest runs check the test set-up, not a device: on the CPU runs only
pytestmark = pytest.mark.skipif("cpu" not in DEVICES, reason="checks the tests' seeding only")


@pytest.mark.skipif(not PROBE, reason="the probe of test_other_seeds_draw_other_inputs")
@settings(max_examples=4, database=None)
@given(st.integers(0, 10 ** 9))
def test_probe_examples(x):
    DRAWN.append(x)


@pytest.mark.skipif(not PROBE, reason="the probe of test_other_seeds_draw_other_inputs")
def test_probe_report(request):
    """One line: the examples drawn, torch's seed against the CRC-32 of this test's id, the
    Hypothesis test's forced seed (None: derandomised by its name), and the emulator's shift."""
    crc = zlib.crc32(request.node.nodeid.encode())
    forced = getattr(test_probe_examples, "_hypothesis_internal_use_seed", None)
    print(f"PROBE {DRAWN} {torch.rand(3).tolist()} crc={torch.initial_seed() == crc} "
          f"forced={forced is not None} {emu.SEED_SHIFT}")


def nested(seed, *args, **env):
    """pytest on ``args`` in this folder under KCACHE_OPS_TEST_SEED=``seed`` and ``env``, without
    the outer run's options (its -k or -n would lose the probe) -> its CompletedProcess."""
    env = dict(os.environ, KCACHE_OPS_TEST_SEED=seed, **env)
    env.pop("PYTEST_ADDOPTS", None)
    return run_pytest(*args, cwd=Path(__file__).parent, env=env, timeout=300)


def probe(seed):
    """The probe's draws in a pytest run under KCACHE_OPS_TEST_SEED=``seed`` -> its PROBE line."""
    res = nested(seed, "-s", f"{Path(__file__).name}::test_probe_examples",
                 f"{Path(__file__).name}::test_probe_report", KCACHE_OPS_SEED_PROBE="1")
    lines = [line for line in res.stdout.splitlines() if "PROBE" in line]
    assert res.returncode == 0 and len(lines) == 1, res.stdout[-2000:] + res.stderr[-2000:]
    return lines[0][lines[0].index("PROBE"):]


def test_other_seeds_draw_other_inputs():
    """0 is CI's seeding (torch from the CRC-32 of the test id, Hypothesis by the test's name,
    no schedule shift); each value draws the same again; 0, 1 and 2 draw three different sets of
    examples and torch inputs."""
    runs = {seed: probe(seed) for seed in ("0", "1", "2")}
    assert probe("1") == runs["1"]
    assert runs["0"].endswith(" crc=True forced=False 0")
    assert runs["1"].endswith(" crc=False forced=True 1000")
    assert runs["2"].endswith(" crc=False forced=True 2000")
    examples = [run.split("]")[0] for run in runs.values()]
    tensors = [run.split("]")[1] for run in runs.values()]
    assert len(set(examples)) == 3 and len(set(tensors)) == 3


@pytest.mark.parametrize("value", ["-1", "x", "", "²", str(2 ** 32)],
                         ids=["negative", "letter", "empty", "superscript", "2^32"])
def test_a_bad_value_is_refused(value):
    res = nested(value, "--co", Path(__file__).name)
    assert res.returncode != 0
    assert f"KCACHE_OPS_TEST_SEED must be an integer in [0, 2^32), got {value!r}" in (
        res.stdout + res.stderr)
