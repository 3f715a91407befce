"""A cache's side stream (kcache_ops/caches/side_stream.py): inline on the CPU; on CUDA ordered
after the current stream's earlier work and joined before its later work."""
import torch

from kcache_ops.caches.side_stream import SideStream
from cuda_checks import requires_cuda


def test_cpu_fork_and_join_run_inline():
    side = SideStream("cpu")
    assert side.stream is None
    x = torch.arange(5.0)  # [5]
    with side.fork():
        y = x * 2  # [5]
    side.join(y)
    assert torch.equal(y, torch.arange(5.0) * 2)


@requires_cuda
def test_cuda_fork_orders_after_and_join_before_the_current_stream():
    side = SideStream("cuda")
    main = torch.cuda.current_stream()
    x = torch.empty(1 << 24, device="cuda")  # [16M]
    for trial in range(3):
        x.fill_(trial + 1.0)  # on the current stream, before the fork
        with side.fork():
            assert torch.cuda.current_stream() == side.stream
            y = x * 2  # [16M], on the side stream: must see the fill
        assert torch.cuda.current_stream() == main
        z = x + 1  # beside y
        side.join(y)
        total = y + z  # after both
        assert torch.equal(total, torch.full_like(x, 3.0 * (trial + 1.0) + 1.0))


@requires_cuda
def test_cuda_join_keeps_the_side_streams_tensors_from_reuse_while_the_current_stream_reads():
    """join(y) records y on the current stream: once y is dropped, the caching allocator gives its
    block to no later side-stream work until the current stream's reads of y are done. The
    current stream sleeps before it reads y; side-stream work issued without a fork (so not
    ordered after that read) allocates a tensor of y's size and fills it: without the record it
    would take y's block and the read would see its fill."""
    side = SideStream("cuda")
    x = torch.randn(1 << 22, device="cuda")  # [4M]
    with side.fork():
        y = x * 2  # [4M], allocated on the side stream
    side.join(y)
    torch.cuda._sleep(200_000_000)  # the current stream: ~0.1 s before it reads y
    read = y + 0  # [4M], queued behind the sleep
    del y
    with torch.cuda.stream(side.stream):  # not forked: runs beside the sleep
        w = torch.full_like(x, float("nan"))  # [4M]
    torch.cuda.synchronize()
    assert torch.equal(read, x * 2)
    assert w.isnan().all()
