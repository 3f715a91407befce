"""kcache_ops.reuse_rows, one decode step of KCache's pool of reused V rows: equal to the reference
over steps that find most of their rows in the pool (the pool indices, the counts and the whole
pool state, bit for bit), and the rows it points at are the rows the selection chose."""
import numpy as np
import pytest
import torch
from conftest import DEVICES, DTYPES, host_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

import kcache_ops
from kcache_ops import reference as R

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: outputs start as NaN


class Twins:
    """A pool of C slots per (sequence, KV head) kept by the op, and its twin kept by the
    reference, on ``device``; V of S positions in host memory. ``strided``: the op reads V, the
    indices, new_pos and step as views among other values (:func:`strided_views`), the
    reference contiguous copies."""

    def __init__(self, B, Hkv, S, D, C, device, dtype, held=None, used=None, strided=False):
        self.v_cpu = torch.randn(B, Hkv, S, D).to(dtype)  # [B, Hkv, S, D]
        self.v_host = host_tensor(self.v_cpu, device)
        self.strided = strided
        if strided:  # v_host every other head of a wider host buffer, from its row 3
            wide = torch.randn(B, 2 * Hkv, S + 7, D).to(dtype)  # [B, 2 Hkv, S + 7, D]
            wide[:, 1::2, 3:S + 3] = self.v_cpu
            self.v_host = host_tensor(wide, device)[:, 1::2, 3:S + 3]
        rows = torch.full((B, Hkv, C, D), float("nan"), dtype=dtype)  # [B, Hkv, C, D]
        if held is None:
            held = torch.full((B, Hkv, C), -1, dtype=torch.int32)
        else:  # the rows of the positions held
            rows = torch.where(held[..., None] >= 0, R.gather_rows(self.v_cpu, held), rows)
        rows = rows.to(device)
        used = torch.full((B, Hkv, C), -1, dtype=torch.int32) if used is None else used
        self.op = [rows, held.to(device), used.to(device)]  # rows, held, used
        self.ref = [t.clone().cpu() for t in self.op]
        self.device = device

    def step(self, indices, new_pos, step, group_select):
        """One step of both: checks they agree and that each entry's slot holds its row."""
        step_t = torch.tensor([step], dtype=torch.int32)  # [1]
        args = (indices, new_pos, step_t)
        if self.strided:
            args = strided_views(indices, new_pos, step, self.v_cpu.shape[2])
        pool_indices, counts = kcache_ops.reuse_rows(
            args[0].to(self.device), self.v_host, args[1].to(self.device), *self.op,
            args[2].to(self.device), group_select)
        want_indices, want_counts = R.reuse_rows(indices, self.v_cpu, new_pos, *self.ref, step_t,
                                                 group_select)
        assert torch.equal(pool_indices.cpu(), want_indices)
        assert torch.equal(counts.cpu(), want_counts)
        for got, want, name in zip(self.op, self.ref, ["rows", "held", "used"]):
            # slots never written keep their NaN
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True, msg=name)
        # the pool's rows at pool_indices are v's at indices (a row read and kept, or read for
        # this step only)
        rows = self.op[0].cpu()
        assert torch.equal(R.gather_rows(rows, pool_indices.cpu()),
                           R.gather_rows(self.v_cpu, indices))
        return counts.cpu()


def strided_views(indices, new_pos, step, S):
    """(indices [B, Hq, N], new_pos [B], step [1]) as views whose neighbours in memory are
    other values an op reading them at the wrong place would take: indices every other head of
    a wider buffer, from its column 2, of random positions in [0, S) around them; new_pos every
    other element, beside each sequence's largest selected position (read as the new token's,
    that row would serve its step only); step at offset 1 between two other step numbers."""
    B, Hq, N = indices.shape
    wide = torch.randint(0, S, (B, 2 * Hq, N + 3), dtype=torch.int32)  # [B, 2 Hq, N + 3]
    wide[:, ::2, 2:N + 2] = indices
    beside = indices.reshape(B, -1).amax(1) if N else new_pos  # [B]
    pos = torch.stack([new_pos.int(), beside.int()], 1)  # [B, 2]
    steps = torch.tensor([step + 5, step, step - 5], dtype=torch.int32)  # [3]
    return wide[:, ::2, 2:N + 2], pos[:, 0], steps[1:2]


def selection(B, Hq, Hkv, N, span, group_select, pad=0.2, gen=None):
    """[B, Hq, N] int32: per head N distinct positions of [0, span) (per group with group_select,
    each head a prefix of the group's list), about ``pad`` of them -1."""
    G = Hq // Hkv
    heads = Hkv if group_select else Hq
    picks = torch.stack([torch.randperm(span, generator=gen)[:N] for _ in range(B * heads)])
    picks = picks.view(B, heads, N).int()  # [B, heads, N]
    if group_select:  # each head keeps a prefix of its group's list (top_p)
        picks = picks.repeat_interleave(G, dim=1)  # [B, Hq, N]
        keep = torch.randint(1, N + 1, (B, Hq, 1), generator=gen)  # [B, Hq, 1]
        return torch.where(torch.arange(N) < keep, picks, -1)
    return picks.masked_fill(torch.rand(B, Hq, N, generator=gen) < pad, -1)


def run_steps(twins, B, Hq, Hkv, N, span, group_select, steps=6, reruns=False):
    """``steps`` steps of selections from a window of ``span`` positions that drifts by one
    position a step; every third step's new token is among its rows -> the counts summed."""
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros(2, dtype=torch.int32)
    for step in range(steps):
        indices = selection(B, Hq, Hkv, N, span, group_select, gen=gen) + step  # [B, Hq, N]
        indices = torch.where(indices >= step, indices, -1)
        new_pos = torch.full((B,), span + step, dtype=torch.int32)  # [B]
        if step % 3 == 2:
            new_pos = indices[:, 0].amax(-1)  # a position this step reads
        attempts = 2 if reruns and step % 2 else 1  # a step given up and run again
        for _ in range(attempts):
            counts = twins.step(indices, new_pos, step, group_select)
        total += counts.sum((0, 1))
    return total


@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_steps_match_reference(device, dtype, G, group_select):
    B, Hkv, N, S, D = 2, 2, 6, 40, 64
    E = N if group_select else G * N
    twins = Twins(B, Hkv, S, D, E + 5, device, dtype)
    reads, hits = run_steps(twins, B, G * Hkv, Hkv, N, 20, group_select)
    assert 0 < hits < reads  # both paths ran: rows found and rows read


@pytest.mark.parametrize("D", [64, 128])
def test_pool_of_one_step(device, D):
    """C = E: every slot may be refilled each step; a step run again with another new token."""
    B, Hkv, G, N = 1, 3, 3, 8
    twins = Twins(B, Hkv, 64, D, G * N, device, torch.bfloat16)
    reads, hits = run_steps(twins, B, G * Hkv, Hkv, N, 30, False, steps=8, reruns=True)
    assert 0 < hits < reads


def test_rows_chosen_by_several_heads(device):
    """Every head of a group chooses the same rows, some twice: each row is read once."""
    twins = Twins(1, 1, 16, 64, 8, device, torch.float32)
    indices = torch.tensor([[[3, 5, 3, -1], [5, 3, 7, 7]]], dtype=torch.int32)  # [1, 2, 4]
    counts = twins.step(indices, torch.tensor([15], dtype=torch.int32), 0, False)
    assert counts.tolist() == [[[3, 0]]]
    counts = twins.step(indices.flip(-1), torch.tensor([15], dtype=torch.int32), 1, False)
    assert counts.tolist() == [[[3, 3]]]


def test_new_token_serves_one_step(device):
    """The new token's row is read into a slot for its step only: the next step reads it again."""
    twins = Twins(1, 1, 16, 64, 4, device, torch.float32)
    indices = torch.tensor([[[9, 2]]], dtype=torch.int32)  # [1, 1, 2]
    assert twins.step(indices, torch.tensor([9], dtype=torch.int32), 0, False).tolist() == \
        [[[2, 0]]]
    assert twins.op[1].cpu().tolist() == [[[-1, 2, -1, -1]]]  # 9's slot (0) holds nothing after
    assert twins.step(indices, torch.tensor([10], dtype=torch.int32), 1, False).tolist() == \
        [[[2, 1]]]


def test_any_pool_state(device, dtype):
    """A pool state the op did not write (slots last read at any step, several free): the same
    refill order as the reference."""
    B, Hkv, C, S = 2, 2, 12, 50
    held = torch.stack([torch.randperm(S)[:C] for _ in range(B * Hkv)]).view(B, Hkv, C).int()
    held[torch.rand(B, Hkv, C) < 0.3] = -1
    used = torch.randint(-1, 7, (B, Hkv, C), dtype=torch.int32)
    twins = Twins(B, Hkv, S, 64, C, device, dtype, held=held, used=used)
    run_steps(twins, B, 4 * Hkv, Hkv, 3, 30, False, steps=3)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_pool_state_below_minus_one_and_twice_held(device, dtype, group_select):
    """A pool state the op did not write: ``used`` below -1 (-7, -2^31) refills as -1 does (ties
    to the lower slot, after a -1 slot before it), and a position held in two slots (9) is found
    in the first of them."""
    held = torch.tensor([[[5, 9, 7, 9, -1, 10]]], dtype=torch.int32)  # [1, 1, 6]
    used = torch.tensor([[[-1, 3, -7, 2, -2 ** 31, 1]]], dtype=torch.int32)  # [1, 1, 6]
    twins = Twins(1, 1, 24, 64, 6, device, dtype, held=held, used=used)
    steps = [[[[9, 3, 12], [9, 10, -1]]], [[[5, 9, 14], [7, -1, 3]]], [[[9, 1, 2], [0, 9, 4]]]]
    for step, indices in enumerate(steps):
        indices = torch.tensor(indices, dtype=torch.int32)  # [1, 2, 3]
        if group_select:  # the group's heads share their list (the second a prefix of it)
            indices = torch.stack([indices[:, 0], indices[:, 0].masked_fill(
                torch.arange(3) == 2, -1)], 1)
        twins.step(indices, torch.tensor([20], dtype=torch.int32), step, group_select)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       N=st.integers(1, 40), extra=st.integers(0, 30), wider=st.integers(0, 60),
       D=st.sampled_from([64, 128]), dtype=st.sampled_from(DTYPES), group_select=st.booleans(),
       steps=st.integers(1, 5))
def test_random_shapes(B, Hkv, G, N, extra, wider, D, dtype, group_select, steps):
    """Odd batches, groups, N, pools from one step's rows to 30 more, selections from windows of
    N to N + 60 positions: every step equals the reference."""
    for device in DEVICES:
        E = N if group_select else G * N
        span = N + wider  # the window each step selects from
        twins = Twins(B, Hkv, span + steps + 1, D, E + extra, device, dtype)
        run_steps(twins, B, G * Hkv, Hkv, N, span, group_select, steps=steps)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_strided_inputs(device, dtype, group_select):
    """indices every other head of a wider buffer, v_host every other head of a wider host
    buffer from its row 3, new_pos every other element, step at an offset, each beside values
    that differ: strides and offsets honoured over steps that find and read rows, as the
    reference over contiguous copies."""
    B, Hkv, G, N, S, D = 3, 2, 3, 5, 45, 64
    E = N if group_select else G * N
    twins = Twins(B, Hkv, S, D, E + 4, device, dtype, strided=True)
    assert not twins.v_host.is_contiguous()
    reads, hits = run_steps(twins, B, G * Hkv, Hkv, N, 17, group_select, steps=5)
    assert 0 < hits < reads


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_no_entries(device, dtype):
    """N = 0: nothing read, counts 0, the pool untouched."""
    twins = Twins(2, 1, 8, 64, 4, device, dtype)
    indices = torch.empty(2, 2, 0, dtype=torch.int32)
    assert twins.step(indices, torch.zeros(2, dtype=torch.int32), 0, False).eq(0).all()


def test_out_of_range_index_is_refused_on_cpu():
    twins = Twins(1, 1, 8, 64, 4, "cpu", torch.float32)
    indices = torch.tensor([[[1, 8]]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"indices\[0, 0, 1\] must be -1 \(padding\) or in "
                                           r"\[0, 8\) \(v_host capacity\), got 8"):
        kcache_ops.reuse_rows(indices, twins.v_host, torch.zeros(1, dtype=torch.int32),
                              *twins.op, torch.zeros(1, dtype=torch.int32), False)


def test_pool_sharing_memory_is_refused(device):
    """The pool (rows, held, used) is updated in place: two of them, or one and an input, in the
    same memory (even through two storages) are refused by name (held passed as used lost the
    pool's positions silently), and the pool is left as it was. Views of one buffer that do not
    overlap are fine."""
    twins = Twins(1, 1, 8, 64, 6, device, torch.float32)
    rows, held, used = twins.op
    indices = torch.tensor([[[3, 5, -1]]], dtype=torch.int32, device=device)  # [1, 1, 3]
    new_pos = torch.zeros(1, dtype=torch.int32, device=device)
    step = torch.zeros(1, dtype=torch.int32, device=device)
    pair = torch.full((2, 1, 1, 6), -1, dtype=torch.int32, device=device)  # held and used in one
    cases = [((indices, twins.v_host, new_pos, rows, held, held, step), "held and used"),
             ((indices, twins.v_host, new_pos, rows, pair.view(-1)[:6].view(1, 1, 6),
               pair.view(-1)[1:7].view(1, 1, 6), step), "held and used"),  # 5 shared
             ((held[..., :3], twins.v_host, new_pos, rows, held, used, step), "held and indices"),
             ((indices, twins.v_host, used[0, 0, :1], rows, held, used, step), "used and new_pos"),
             ((indices, rows, new_pos, rows, held, used, step), "rows and v_host")]
    if device == "cpu":  # one NumPy array, two tensors (two storages) over its memory
        shared = np.full((1, 1, 6), -1, dtype=np.int32)
        cases.append(((indices, twins.v_host, new_pos, rows, torch.from_numpy(shared),
                       torch.from_numpy(shared), step), "held and used"))
    for args, names in cases:
        with pytest.raises(RuntimeError, match=f"{names} must not share memory \\("
                                               f"{names.split()[0]} is updated in place\\)"):
            kcache_ops.reuse_rows(*args, False)
    assert held.eq(-1).all() and used.eq(-1).all() and rows.isnan().all()
    pool_indices, _ = kcache_ops.reuse_rows(indices, twins.v_host, new_pos, rows, pair[0],
                                            pair[1], step, False)
    assert pair[0].ge(0).sum() == 2 and pool_indices.ge(0).sum() == 2


def test_rows_requiring_grad_are_refused(device):
    """rows, written in place, requiring grad is refused by name where grad is on, by the wrapper
    and through torch.ops alike: a backward through them gave the overwritten slots the gradient
    of the values they held. Under no_grad the call runs; a V that requires grad is read (the
    caches' host V does where the model runs with grad on), as the other ops read theirs."""
    twins = Twins(1, 1, 8, 64, 6, device, torch.float32)
    rows, held, used = twins.op
    indices = torch.tensor([[[3, 5, -1]]], dtype=torch.int32, device=device)  # [1, 1, 3]
    new_pos = torch.zeros(1, dtype=torch.int32, device=device)
    step = torch.zeros(1, dtype=torch.int32, device=device)
    pool = rows.clone().requires_grad_().clone()  # [1, 1, 6, 64], not a leaf (torch refuses
    # a leaf's in-place update itself)
    for op in (kcache_ops.reuse_rows, torch.ops.kcache_ops.reuse_rows):
        with pytest.raises(ValueError, match="reuse_rows: rows must not require grad"):
            op(indices, twins.v_host, new_pos, pool, held, used, step, False)
    assert held.eq(-1).all() and used.eq(-1).all()
    with torch.no_grad():
        pool_indices, _ = kcache_ops.reuse_rows(indices, twins.v_host, new_pos, pool, held,
                                                used, step, False)
    assert pool_indices.ge(0).sum() == 2
    fresh = Twins(1, 1, 8, 64, 6, device, torch.float32)
    rows, held, used = fresh.op
    v = host_tensor(fresh.v_cpu, device).requires_grad_()  # pinned where the op runs on CUDA
    pool_indices, _ = kcache_ops.reuse_rows(indices, v, new_pos, rows, held, used, step, False)
    slots = pool_indices[0, 0, :2].long()  # [2], the slots of rows 3 and 5
    assert torch.equal(rows[0, 0, slots].cpu(), v.detach().cpu()[0, 0, [3, 5]])


def test_the_pool_is_written_in_place_as_autograd_knows_it(device):
    """rows, held and used are written as by torch's own in-place ops: their version counters go
    up, so a backward that saved rows raises (it ran, on the rows written since); a pool with an
    inference tensor is refused by name outside torch.inference_mode, unwritten, its other
    tensors' versions as they were (it was written without a word), and is written inside it."""
    twins = Twins(1, 1, 8, 64, 6, device, torch.float32)
    rows, held, used = twins.op
    indices = torch.tensor([[[3, 5, -1]]], dtype=torch.int32, device=device)  # [1, 1, 3]
    new_pos = torch.zeros(1, dtype=torch.int32, device=device)
    step = torch.zeros(1, dtype=torch.int32, device=device)
    weight = torch.randn(rows.shape, device=device, requires_grad=True)  # [1, 1, 6, 64]
    loss = (weight * rows).sum()  # saves rows for its backward
    versions = [t._version for t in twins.op]
    kcache_ops.reuse_rows(indices, twins.v_host, new_pos, rows, held, used, step, False)
    assert [t._version for t in twins.op] == [v + 1 for v in versions]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.inference_mode():
        pool = [rows.clone(), torch.full_like(held, -1), torch.full_like(used, -1)]
    for mixed, name in ((pool, "rows"), ([rows, held, pool[2]], "used")):
        versions = [t._version for t in mixed if not t.is_inference()]
        with pytest.raises(RuntimeError, match=f"reuse_rows: {name} must not be an inference "
                                               "tensor outside torch.inference_mode"):
            kcache_ops.reuse_rows(indices, twins.v_host, new_pos, *mixed, step, False)
        assert [t._version for t in mixed if not t.is_inference()] == versions
    assert pool[1].eq(-1).all() and pool[2].eq(-1).all()
    with torch.inference_mode():
        pool_indices, _ = kcache_ops.reuse_rows(indices, twins.v_host, new_pos, *pool, step,
                                                False)
    assert pool_indices.ge(0).sum() == 2 and pool[1].ge(0).sum() == 2


def test_rows_as_a_negated_or_conjugated_view_are_refused(device):
    """rows as a lazily negated view (a complex conjugate's imaginary part) or a conjugated one,
    held or used as a negated one: torch runs the op on a resolved copy of that tensor and then
    fails its own internal assert, after the other two were written, so that the pool said it
    held rows it did not. Refused by name before the op runs; the pool is left as it was."""
    twins = Twins(1, 1, 8, 64, 6, device, torch.float32)
    _, held, used = twins.op
    indices = torch.tensor([[[3, 5, -1]]], dtype=torch.int32, device=device)  # [1, 1, 3]
    new_pos = torch.zeros(1, dtype=torch.int32, device=device)
    step = torch.zeros(1, dtype=torch.int32, device=device)
    base = torch.randn(1, 1, 6, 64, dtype=torch.complex64, device=device)  # [1, 1, C, D]
    for rows, v_host, flags in ((base.conj().imag, twins.v_host, r"is_neg\(\) True"),
                                (base.conj(), twins.v_host.to(torch.complex64),
                                 r"is_conj\(\) True")):
        with pytest.raises(ValueError, match="reuse_rows: rows must not be a lazily negated or "
                                             rf"conjugated view .*{flags}"):
            kcache_ops.reuse_rows(indices, v_host, new_pos, rows, held, used, step, False)
        assert held.eq(-1).all() and used.eq(-1).all()
    rows = twins.op[0]  # [1, 1, C, D] float32, poisoned
    before = rows.clone()
    for name, args in (("held", (rows, torch._neg_view(held), used)),
                       ("used", (rows, held, torch._neg_view(used)))):
        with pytest.raises(ValueError, match=f"reuse_rows: {name} must not be a lazily negated "
                                             r"or conjugated view .*is_neg\(\) True"):
            kcache_ops.reuse_rows(indices, twins.v_host, new_pos, *args, step, False)
        assert held.eq(-1).all() and used.eq(-1).all()
        assert rows.view(torch.int32).equal(before.view(torch.int32))


def test_pool_smaller_than_a_step_is_refused(device):
    twins = Twins(1, 1, 8, 64, 3, device, torch.float32)
    indices = torch.zeros(1, 2, 2, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"rows must have at least 4 slots \(the rows of one "
                                           r"step: G x N\), got 3"):
        kcache_ops.reuse_rows(indices, twins.v_host, torch.zeros(1, dtype=torch.int32,
                              device=device), *twins.op, torch.zeros(1, dtype=torch.int32,
                              device=device), False)
