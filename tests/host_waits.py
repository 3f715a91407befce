"""What would make a CUDA decode step wait on the host, found on the CPU, where nothing syncs:
:func:`host_waits` records each tensor value read on the host and each kcache_ops op called with
its value check on (on CUDA that check reads the lengths or indices back); and each index_put_
that torch's deterministic mode would run on CUDA by copying its whole destination (the CPU runs
none of that mode's sorting index_put_, so this too is found from the call's form)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the host reads that do not pass the dispatcher: in inference mode .item() and int() of a CPU
# tensor, and .tolist() and .numpy() anywhere
HOST_READS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")


# ops whose output size depends on values (on CUDA each reads a count back to the host), and
# torch.equal, whose bool answer is read back
SIZED_BY_VALUES = {"nonzero", "masked_select", "_unique2", "_unique", "unique_dim",
                   "unique_consecutive", "unique_dim_consecutive", "bincount", "equal"}


def _bool_indices(indices):
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _copies_whole(dst, indices):
    """Whether ``dst[indices] = x`` copies all of dst, out and back, under torch's deterministic
    mode on CUDA: its index_put_ sorts a linear index, over a contiguous copy of a non-contiguous
    dst, and over a permuted copy where the index tensors are not side by side (dst[i, :, j])."""
    at = [k for k, i in enumerate(indices or ()) if i is not None]
    return bool(at) and (not dst.is_contiguous() or at != list(range(at[0], at[-1] + 1)))


class HostWaits(TorchDispatchMode):
    """Records, in ``found``, each op that would make a CUDA step wait on the host: a tensor's
    value read (``aten._local_scalar_dense``: ``.item()``, ``int()``, ``bool()`` of a tensor), an
    op whose output size depends on values (nonzero, masked_select, unique, indexing by a bool
    mask, repeat_interleave of a tensor of repeats without ``output_size``, bincount; and
    torch.equal), a kcache_ops op whose ``check_values`` is on (given or by default), and an
    index_put_ that deterministic mode runs by copying its whole destination
    (:func:`_copies_whole`)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.removeprefix("aten::")
        if func is torch.ops.aten._local_scalar_dense.default:
            self.found.append("a tensor's value read on the host")
        elif func.namespace == "aten" and name in SIZED_BY_VALUES:
            self.found.append(f"{func.name()}: its size or answer depends on values")
        elif func.namespace == "aten" and name in ("index", "index_put", "index_put_") \
                and _bool_indices(args[1] if len(args) > 1 else kwargs.get("indices")):
            self.found.append(f"{func.name()} with a bool mask: its size depends on values")
        elif func.namespace == "aten" and name in ("index_put", "index_put_") \
                and _copies_whole(args[0], args[1] if len(args) > 1 else kwargs.get("indices")):
            self.found.append(f"{func.name()} into a non-contiguous tensor or with its index "
                              "tensors apart: deterministic mode copies the whole tensor")
        elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
                and kwargs.get("output_size") is None:
            self.found.append(f"{func.name()} without output_size: its size depends on values")
        elif func.namespace == "kcache_ops":
            names = [a.name for a in func._schema.arguments]
            if "check_values" in names:
                at = names.index("check_values")
                if kwargs.get("check_values", args[at] if at < len(args) else True):
                    self.found.append(f"{func.name()} with check_values on")
        return func(*args, **kwargs)


def _no_host_read(self, *args, **kwargs):
    raise AssertionError("the decode step read a tensor's values on the host")


@contextlib.contextmanager
def host_waits():
    """-> a :class:`HostWaits` recording the block's waits; the Tensor methods of
    :data:`HOST_READS` raise AssertionError inside it."""
    with pytest.MonkeyPatch.context() as patch, HostWaits() as waits:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, _no_host_read)
        yield waits
