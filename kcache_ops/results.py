"""The results layer: the folder results go to, the machine a run ran on, and the JSON files the
``eval`` and ``bench`` commands and the scripts in bench/ write there (REPORT.md is generated from
them by :mod:`kcache_ops.report`)."""
import json
import math
import os
import platform
import subprocess
import tempfile
import threading

import torch


def results_dir(package_parent):
    """Where full runs write by default, for a package imported from ``package_parent``: the
    checkout's bench/results where that folder is a checkout (`make build`, ``pip install -e``);
    installed elsewhere (site-packages), ``kcache_ops_results`` in the working folder."""
    if os.path.isfile(os.path.join(package_parent, "setup.py")):
        return os.path.join(package_parent, "bench", "results")
    return os.path.abspath("kcache_ops_results")


PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = results_dir(PACKAGE_PARENT)
# where a smoke run (``eval --quick``, ``bench --small``) writes unless told: never over the
# committed results
SMOKE_DIR = os.path.join(tempfile.gettempdir(), "kcache_ops_smoke")


def out_dir(out, smoke):
    """The folder a command writes its results to: ``out`` where the user gave one (ValueError
    where it is a file), else :data:`SMOKE_DIR` for a smoke run and :data:`RESULTS_DIR` for a
    real one."""
    if out is None:
        return SMOKE_DIR if smoke else RESULTS_DIR
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out must be a folder (made where missing), got the file {out}")
    return out


def prepare_out_dir(out, smoke):
    """:func:`out_dir`, made where missing and checked writable, before a command's work (it
    was found unwritable only when the results were saved): ValueError naming it."""
    folder = out_dir(out, smoke)
    what = "the results folder" if out is None else "--out"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # what the run will do at its end
            pass
    except OSError as e:
        raise ValueError(f"{what} {folder} cannot be written to ({e.strerror or e}); choose "
                         f"another folder with --out") from None
    return folder


def git_commit(folder=PACKAGE_PARENT):
    """The commit checked out at ``folder`` (default the package's parent: the checkout, where
    kcache_ops runs from one), with "-dirty" where tracked files differ from it; where it is not a
    git checkout (the device tool's copy of the working tree has no .git) the environment's
    KCACHE_OPS_GIT_COMMIT, else None; None too where git is not there."""
    def git(*args):
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    if not os.path.exists(os.path.join(folder, ".git")):  # not a checkout: site-packages, a copy
        return os.environ.get("KCACHE_OPS_GIT_COMMIT") or None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cuda_driver():
    """The CUDA version the installed driver supports (cuDriverGetVersion, e.g. "13.0"), None
    where the driver library cannot be asked (torch does not expose it)."""
    import ctypes
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def machine(device):
    """What a run ran on -> {"cpu": model name, "cores": the CPUs this process may run on,
    "threads": torch's threads (``--threads``), "load_avg_1min": the host's 1-minute load
    average as the run begins (pyperf records it too: a value near "cores" or above means other
    work was sharing the CPUs), "torch": version, "device": str(device), "git_commit":
    :func:`git_commit`, and where ``device`` is a CUDA device "gpu": its name, "cuda_runtime":
    torch's CUDA version, "cuda_driver": :func:`cuda_driver`}."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device), "git_commit": git_commit()}
    if hasattr(os, "getloadavg"):  # not on Windows
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    if torch.device(device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda_runtime=torch.version.cuda,
                    cuda_driver=cuda_driver())
    return info


def ran_on(m, tail=""):
    """The machine line of a report section from a :func:`machine` dict ``m``: CPU, cores and
    torch threads, the load average at the start, device (GPU name), torch, the CUDA runtime and
    driver and the commit where recorded (a file of an earlier version lacks them, and its
    "cores" are torch's threads), then ``tail``."""
    cpus = (f"{m['cores']} cores, torch threads: {m['threads']}" if "threads" in m
            else f"torch threads: {m['cores']}")
    if m.get("load_avg_1min") is not None:
        cpus += f", load average {m['load_avg_1min']:.2f} at the start"
    cuda = (f" (CUDA {m['cuda_runtime']}, driver CUDA {m.get('cuda_driver') or 'unknown'})"
            if m.get("cuda_runtime") else "")
    commit = f", commit {m['git_commit'][:12]}" if m.get("git_commit") else ""
    dirty = " (uncommitted changes)" if (m.get("git_commit") or "").endswith("-dirty") else ""
    return (f"Ran on {m['cpu']} ({cpus}), device {m['device']}"
            f"{', ' + m['gpu'] if 'gpu' in m else ''}, torch {m['torch']}{cuda}{commit}{dirty}"
            f"{tail}")


# a report section's line for a JSON file whose run stopped before its end ("complete": false)
CUT_OFF = ["**This run was cut off before its end**: the rows below are the configurations it "
           "finished.", ""]


def write_json(path, obj):
    """Write ``obj`` as JSON to ``path``, creating its folder; through a temporary file renamed
    over it, so that a run killed while writing leaves the last complete file. A float that is
    not finite (a peak the CPU does not measure, a baseline not run) is written as null:
    standard JSON has no NaN, and other readers than Python's refuse it."""
    write_text(path, json.dumps(_finite_or_none(obj), indent=1, allow_nan=False))


def write_text(path, text):
    """Write ``text`` to ``path`` (UTF-8), creating its folder, through a temporary file renamed
    over it: a reader sees the old file or the new one, whole. The temporary file is this
    thread's own (two runs writing the same file shared one, and one's rename took the other's)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = f"{path}.{os.getpid()}-{threading.get_ident()}.part"
    try:
        with open(part, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(part, path)
    except BaseException:
        if os.path.exists(part):
            os.unlink(part)
        raise


def _finite_or_none(obj):
    """``obj`` with every float that is not finite, in its dicts, lists and tuples, as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def load_json(path):
    """The JSON object at ``path``, or None where the file is not there; ValueError naming the
    file where it is not JSON."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
