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
