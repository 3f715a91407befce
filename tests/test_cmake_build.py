"""CMakeLists.txt builds the same library as setup.py: build it with CMake (into build-cmake/,
incrementally) and run the ops from that build in a fresh interpreter."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kcache_ops

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import torch, kcache_ops
from kcache_ops import reference
assert kcache_ops._C.__file__.startswith({pkg!r}), kcache_ops._C.__file__
assert kcache_ops.built_with_cuda() == {cuda}, "CMake and setup.py disagree on CUDA"
g = torch.Generator().manual_seed(0)
q, k = torch.randn(2, 8, 64, generator=g), torch.randn(2, 2, 50, 64, generator=g)
lens = torch.tensor([50, 17], dtype=torch.int32)
got, ref = kcache_ops.qk_topn(q, k, lens, 8), reference.qk_topn(q, k, lens, 8)
assert torch.equal(got[1], ref[1]) and torch.allclose(got[0], ref[0], atol=1e-5)
print("cmake build ok")
"""


@pytest.mark.skipif(kcache_ops.built_with_cuda() is False and torch.version.cuda is not None
                    and shutil.which("nvcc") is None,
                    reason="torch's CUDA build needs the CUDA toolkit for CMake to find torch")
def test_cmake_build_runs_the_ops(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to check CMakeLists.txt (apt-get install cmake)"
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    build = ROOT / "build-cmake"
    subprocess.run([cmake, "-S", ROOT, "-B", build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                    f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                    f"-DKCACHE_OPS_CUDA={'ON' if kcache_ops.built_with_cuda() else 'OFF'}"],
                   check=True, capture_output=True, text=True)
    jobs = os.environ.get("MAX_JOBS", "2")
    done = subprocess.run([cmake, "--build", build, "-j", jobs], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (build / "compile_commands.json").is_file()
    (so,) = build.glob("_C*.so")

    pkg = tmp_path / "kcache_ops"
    shutil.copytree(ROOT / "kcache_ops", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(so, pkg)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = CHECK.format(pkg=str(pkg), cuda=kcache_ops.built_with_cuda())
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_cmake_refuses_a_static_libstdcxx_compiler(tmp_path):
    """A compiler that links libstdc++ statically (a second C++ runtime beside torch's) stops the
    configure with what to set, before anything is built."""
    cmake, gxx = shutil.which("cmake"), shutil.which("g++")
    if not (cmake and gxx):
        pytest.skip("needs cmake and g++")
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} "$@" -static-libstdc++\n', encoding="utf-8")
    wrapper.chmod(0o755)
    done = subprocess.run([cmake, "-S", ROOT, "-B", tmp_path / "build",
                           f"-DCMAKE_CXX_COMPILER={wrapper}",
                           f"-DPython3_EXECUTABLE={sys.executable}"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    said = " ".join((done.stdout + done.stderr).split())  # CMake wraps its messages
    assert "links the C++ runtime (libstdc++) statically" in said
