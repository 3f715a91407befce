"""setup.py builds with a compiler that links the C++ runtime as torch does (libstdc++.so): one that
links it statically (as a wrapper on one GPU machine did, crashing the first error message that
formatted a number) is replaced by the system g++; KCACHE_OPS_CUDA is 0, 1 or unset; an sdist
carries every source and no partial test suite; a build without torch, a checkout without its
compiled library and a library that does not load say so."""
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
    wrapper.write_text(f'#!/bin/sh\nexec {SYSTEM_GXX} "$@" -static-libstdc++\n', encoding="utf-8")
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


def test_kcache_ops_cuda_takes_0_or_1():
    status, out = setup_version(KCACHE_OPS_CUDA="OFF")
    assert status != 0
    assert "KCACHE_OPS_CUDA must be 0 (CPU-only build), 1 (CUDA build) or unset" in out


def test_the_sdist_holds_every_source(tmp_path):
    """An sdist builds elsewhere: it must carry the headers and the CUDA sources (whatever this
    build chose), not only the files setup.py compiles here."""
    import tarfile
    done = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base",
                           str(tmp_path), "sdist", "-d", str(tmp_path)],  # a fresh file list
                          cwd=ROOT, text=True, capture_output=True,
                          env={**os.environ, "KCACHE_OPS_CUDA": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for path in ("csrc/checks.h", "csrc/shape_checks.h", "csrc/cpu/isa.h",
                 "csrc/cuda/qk_topn.cu", "csrc/cuda/qk_topn_kernel.cuh", "CMakeLists.txt",
                 "requirements.txt", "constraints.txt"):
        assert path in names, path
    # the tests run from the repository: not setuptools' default of test files without the
    # helpers they import
    assert not [n for n in names if n.startswith("tests/")]


def test_a_build_without_torch_says_to_install_it():
    """setup.py compiles against the torch already installed: where there is none, it says so
    (not a traceback from the middle of pip's metadata step)."""
    run_setup = ("import runpy, sys; sys.modules['torch'] = None; "  # import torch fails
                 "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', "
                 "run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", run_setup], cwd=ROOT, text=True,
                          capture_output=True)
    assert done.returncode != 0
    assert "kcache_ops: the build compiles against the torch of this Python" in done.stderr
    assert "install torch first (`pip install torch`), then build again" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_checkout_without_its_library_says_so(tmp_path):
    """Importing kcache_ops from a folder that has its Python files but no compiled _C (a checkout
    not built yet) names what is missing and what to do, not a circular import."""
    import shutil
    shutil.copytree(ROOT / "kcache_ops", tmp_path / "kcache_ops",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    done = subprocess.run([sys.executable, "-c", "import kcache_ops"], cwd=tmp_path, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0
    assert "the compiled library _C is not in" in done.stderr
    assert "run `make build` there" in done.stderr


def test_a_library_that_does_not_load_says_how_to_rebuild(tmp_path):
    """A _C that fails to load (built against another torch, say) names the torch it met and
    how to rebuild, with the loader's own message."""
    import shutil
    import sysconfig
    shutil.copytree(ROOT / "kcache_ops", tmp_path / "kcache_ops",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    library = tmp_path / "kcache_ops" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    library.write_bytes(b"not a shared library")
    done = subprocess.run([sys.executable, "-c", "import kcache_ops"], cwd=tmp_path, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0
    assert "kcache_ops: the compiled library _C does not load beside torch" in done.stderr
    assert str(library) in done.stderr  # the loader's message
    assert "`pip install --no-build-isolation .` in its source folder" in done.stderr
