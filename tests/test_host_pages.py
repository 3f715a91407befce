"""bench/host_pages.py, the gather bench's huge-page host buffers: their memory, alignment and the
machine facts they record, on the CPU; registration for the GPU where one is present."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import host_pages  # noqa: E402


def test_buffer_is_aligned_writable_and_rounded_up():
    buf = host_pages.HugePageBuffer(3 * host_pages.HUGE_PAGE + 5)
    assert buf.data.dtype == torch.uint8 and buf.data.numel() == 4 * host_pages.HUGE_PAGE
    assert buf.data.data_ptr() % host_pages.HUGE_PAGE == 0
    view = buf.data[:1 << 20].view(torch.bfloat16)  # [512 Ki], as gpu_gather views it
    view.fill_(1.5)
    assert view.sum().item() == 1.5 * view.numel() and not buf.registered
    buf.close()  # nothing registered: nothing to undo


@pytest.mark.parametrize("nbytes", [0, -1])
def test_an_empty_buffer_is_refused(nbytes):
    with pytest.raises(ValueError, match="nbytes must be positive"):
        host_pages.HugePageBuffer(nbytes)


def test_meminfo_and_thp_mode_read_the_machine_files(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nAnonHugePages:    4096 kB\n", encoding="utf-8")
    assert host_pages.meminfo_bytes("AnonHugePages", str(meminfo)) == 4096 * 1024
    assert host_pages.meminfo_bytes("ShmemHugePages", str(meminfo)) == -1
    assert host_pages.meminfo_bytes("AnonHugePages", str(tmp_path / "none")) == -1
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n", encoding="utf-8")
    assert host_pages.thp_mode(str(enabled)) == "madvise"
    assert host_pages.thp_mode(str(tmp_path / "none")) == "unknown"
    assert host_pages.thp_mode() in ("always", "madvise", "never", "unknown")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_registered_buffer_is_read_by_the_gather_kernel():
    """A registered buffer is pinned, device-mapped host memory: gather_rows reads it as it reads
    alloc_host's."""
    import kcache_ops
    buf = host_pages.HugePageBuffer(host_pages.HUGE_PAGE)
    buf.register()
    try:
        src = buf.data.view(torch.bfloat16).view(1, 2, -1, 64)  # [B, Hs, S, D]
        src.copy_(torch.randn(src.shape).to(torch.bfloat16))
        idx = torch.tensor([[[3, 0, 7], [1, 1, 5]]], dtype=torch.int32, device="cuda")
        out = kcache_ops.gather_rows(src, idx)  # [1, 2, 3, 64]
        torch.cuda.synchronize()
        want = torch.stack([src[0, h, idx[0, h].long().cpu()] for h in range(2)])[None]
        assert torch.equal(out.cpu(), want)
    finally:
        buf.close()
