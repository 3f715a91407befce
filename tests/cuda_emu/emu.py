"""Build and drive the CPU emulator of the CUDA kernels (README.md): compile the harness with the
system g++, write a case file, run it under some schedule seeds, read the outputs back."""
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KERNEL_DIR = REPO / "csrc" / "cuda"

# The binary's dtype codes (case.h DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3,
               torch.uint8: 4}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}

# The race-checking build: harness.cpp carries -fsanitize=thread's access instrumentation, whose
# entry points runtime.cpp implements (no TSan runtime is linked). The sanitizer build: ASan +
# UBSan (alignment included, so a misaligned 16-byte load stops the run), no race check.
FLAVOURS = {
    "race": {"harness": ["-O2", "-fsanitize=thread"], "other": ["-O2"], "link": [],
             "defines": ["-DEMU_SHADOW=1"]},
    "asan": {"harness": ["-O1", "-fno-omit-frame-pointer"], "other": ["-O1"],
             "all": ["-fsanitize=address,undefined,float-cast-overflow",
                     "-fno-sanitize-recover=all"],
             "link": ["-fsanitize=address,undefined,float-cast-overflow"],
             "defines": ["-DEMU_SHADOW=0"]},
}
# KCACHE_OPS_EMU_FMA=1: every build contracts a * b + c into fused multiply-adds where g++ finds
# them, as nvcc does by default on the GPU (not at the same places); unset, each rounds twice.
CONTRACT = (["-mfma", "-ffp-contract=fast"] if os.environ.get("KCACHE_OPS_EMU_FMA") == "1"
            else [])
# KCACHE_OPS_TEST_SEED=k (tests/conftest.py): the schedule seeds a run names, shifted by 1000 · k
SEED_SHIFT = 1000 * int(os.environ.get("KCACHE_OPS_TEST_SEED", "0"))
SOURCES = ["harness.cpp", "runtime.cpp", "case_io.cpp"]
ERROR_EXIT = 3


class EmulatorError(AssertionError):
    """The emulator stopped a kernel: a race, a divergent barrier, a partial warp, a sanitizer
    report or outputs that depend on the schedule. The message is the harness's stderr."""


def _source_digest(kernel_dir, flavour):
    """The build's key: its sources, its flags and the compiler's version."""
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(repr((flavour, FLAVOURS[flavour], CONTRACT, compiler)).encode())
    files = sorted(HERE.glob("*.cpp")) + sorted(HERE.glob("*.h")) + sorted(HERE.glob("*.ld"))
    files += sorted(HERE.glob("*.cuh")) + sorted((HERE / "include").glob("*.h"))
    files += sorted(Path(kernel_dir).glob("*.cuh"))
    files += sorted(Path(kernel_dir).glob("*.h"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(flavour="race", kernel_dir=KERNEL_DIR, cache_dir=None):
    """Compiles the harness (once per source digest) and returns the executable's path.

    kernel_dir: the folder whose *_kernel.cuh are compiled (csrc/cuda, or a mutant's copy).
    """
    cfg = FLAVOURS[flavour]
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "kcache_ops_cuda_emu")
    out_dir = cache_dir / f"{flavour}-{_source_digest(kernel_dir, flavour)}"
    exe = out_dir / "emu_harness"
    if exe.exists():
        return exe
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir))
    common = ["g++", "-std=c++20", "-g1", "-pthread", *cfg["defines"], *cfg.get("all", []),
              *CONTRACT]
    includes = [f"-I{HERE / 'include'}", f"-I{kernel_dir}", f"-I{HERE}"]
    for src in SOURCES:
        flags = cfg["harness"] + ["-fdata-sections"] if src == "harness.cpp" else cfg["other"]
        obj = tmp / src.replace(".cpp", ".o")
        _compile([*common, *flags, *includes, "-c", str(HERE / src), "-o", str(obj)])
    objs = [str(tmp / s.replace(".cpp", ".o")) for s in SOURCES]
    _compile(["g++", "-pthread", *cfg["link"], *objs, f"-Wl,-T,{HERE / 'shared.ld'}", "-o",
              str(tmp / "emu_harness")])
    _check_shared_section(tmp / "emu_harness")
    try:
        os.replace(tmp, out_dir)
    except OSError:  # built concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return exe


def _compile(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed:\n{res.stderr[-6000:]}")


def _check_shared_section(exe):
    """Every symbol of the emulated shared memory must be a kernel's __shared__ variable."""
    rows = subprocess.run(["nm", "-C", "-n", str(exe)], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    inside, names = False, []
    for row in rows:
        name = row[19:]
        if name == "__start_emu_shared":
            inside = True
        elif name == "__stop_emu_shared":
            break
        elif inside:
            names.append(name)
    stray = [n for n in names if not n.startswith(("kcache_ops::", "emu_selftest::"))]
    if not names or stray:
        raise RuntimeError(f"the shared-memory section of {exe} holds {stray or 'nothing'}")


def _put_str(parts, s):
    b = s.encode()
    parts.append(struct.pack("<I", len(b)) + b)


def write_case(path, op, scalars, tensors):
    """op: an op of harness.cpp's run_case; scalars: name -> number; tensors: name ->
    CPU tensor (any strides: its whole storage is written with sizes, strides and offset)."""
    parts = [b"KEMUCASE"]
    _put_str(parts, op)
    parts.append(struct.pack("<I", len(scalars)))
    for name, value in scalars.items():
        _put_str(parts, name)
        parts.append(struct.pack("<d", float(value)))
    parts.append(struct.pack("<I", len(tensors)))
    for name, t in tensors.items():
        storage = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())  # raw bytes
        _put_str(parts, name)
        parts.append(struct.pack("<II", DTYPE_CODES[t.dtype], t.dim()))
        parts.append(struct.pack(f"<{t.dim()}q", *t.shape))
        parts.append(struct.pack(f"<{t.dim()}q", *t.stride()))
        parts.append(struct.pack("<qQ", t.storage_offset(), storage.numel()))
        parts.append(storage.numpy().tobytes())
    Path(path).write_bytes(b"".join(parts))


def read_outputs(path):
    """-> {name: contiguous CPU tensor}."""
    data = Path(path).read_bytes()
    assert data[:8] == b"KEMUOUT1", "not an output file"
    pos, out = 8, {}
    (count,) = struct.unpack_from("<I", data, pos)
    pos += 4
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, pos)
        name = data[pos + 4:pos + 4 + n].decode()
        pos += 4 + n
        code, ndim = struct.unpack_from("<II", data, pos)
        pos += 8
        shape = struct.unpack_from(f"<{ndim}q", data, pos)
        pos += 8 * ndim
        (nbytes,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        raw = (torch.frombuffer(bytearray(data[pos:pos + nbytes]), dtype=torch.uint8)
               if nbytes else torch.empty(0, dtype=torch.uint8))  # frombuffer refuses 0 bytes
        pos += nbytes
        out[name] = raw.view(CODE_DTYPES[code]).reshape(shape)
    return out


def run(exe, op, scalars, tensors, seeds=(1, 2, 3), skip_barrier=None, race_check=True,
        stats=None, timeout=300):
    """Runs one case under each seed (outputs must agree bit for bit) -> {name: tensor}.

    skip_barrier: 'file.cuh:LINE', a __syncthreads the run treats as absent (a mutant).
    race_check: False turns the shared-memory shadow off (the schedule alone must then expose a
    race through wrong or schedule-dependent outputs).
    stats: a dict that receives 'skip_hits', the calls of skip_barrier that were skipped.
    Raises EmulatorError when the emulator or a sanitizer stops the run.
    """
    with tempfile.TemporaryDirectory() as tmp:
        case, out = Path(tmp) / "case.bin", Path(tmp) / "out.bin"
        write_case(case, op, scalars, {k: v.cpu() for k, v in tensors.items()})
        cmd = [str(exe), str(case), str(out),
               "--seeds", ",".join(str(s + SEED_SHIFT) for s in seeds)]
        if skip_barrier:
            cmd += ["--skip-barrier", skip_barrier]
        if not race_check:
            cmd.append("--no-race-check")
        env = dict(os.environ,
                   ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=1:exitcode=3",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=3")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if res.returncode == ERROR_EXIT or res.returncode < 0:
            raise EmulatorError(f"{op} {dict(scalars)}: {res.stderr[-4000:]}")
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr[-4000:]}")
        if stats is not None:
            stats["skip_hits"] = int(re.search(r"skip-hits (\d+)", res.stdout).group(1))
        return read_outputs(out)
