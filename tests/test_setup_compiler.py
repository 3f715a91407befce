"""setup.py builds with a compiler that links the C++ runtime as torch does (libstdc++.so): one that
links it statically (as a wrapper on one GPU machine did, crashing the first error message that
formatted a number) is replaced by the system g++."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_GXX = "/usr/bin/g++"


def setup_version(**env):
    """`python setup.py --version` under `env`: (exit status, stdout + stderr)."""
    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, text=True,
                          env={**os.environ, **env}, capture_output=True)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.skipif(not os.path.isfile(SYSTEM_GXX), reason="needs the system g++")
def test_a_static_runtime_compiler_is_replaced(tmp_path):
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {SYSTEM_GXX} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    status, out = setup_version(CXX=str(wrapper))
    assert status == 0, out
    assert f"{wrapper} links the C++ runtime statically" in out
    assert f"building with CXX={SYSTEM_GXX} CC=/usr/bin/gcc" in out


@pytest.mark.skipif(not os.path.isfile(SYSTEM_GXX), reason="needs the system g++")
def test_the_system_compiler_is_kept():
    status, out = setup_version(CXX=SYSTEM_GXX)
    assert status == 0, out
    assert "statically" not in out
