"""A pytest plugin: an op test file's device-parametrized cases, run through the CUDA kernels on
the CPU emulator instead of the CPU op, so that a test's CUDA case is checked without a GPU.

    cd tests && KCACHE_OPS_TEST_DEVICES=cpu python -m pytest -p cuda_emu.on_emulator \\
        test_sparse_attn_v.py test_gather_rows.py test_reuse_rows.py test_qk_topn.py \\
        test_lowbit_tail.py

Only the cases that take the ``device`` fixture run (on "cpu"); ``kcache_ops.<op>`` is swapped for
a call of the emulated kernel (test_cuda_emu.py's ``run_<op>``: the race-checking build, seeds
1, 2, 3 whose outputs must agree bit for bit, 132 SMs as on an H100 or H200, and host reads
spread over them as the launcher spreads them: by default gather_rows' and not sparse_attn_v's,
KCACHE_OPS_HOST_READ_SPREAD 0 or 1 neither or both). What the emulator does not
run is the launcher in the .cu files: its argument checks and its early returns. The cases that
test those are left out (KNOWN, with the reason, as is one whose CPU answer the kernel does not
give), and qk_topn's ``return_scores`` entries past L_b, undefined on CUDA (the score scratch;
the emulator poisons it), are set to -inf as the CPU op sets them. The default suite runs
sparse_attn_v's, gather_rows' and reuse_rows' files and 216 cases of qk_topn's and
lowbit_tail's (test_cuda_emu.py); those two files whole take minutes.
"""
import math
import os

import pytest
import torch

import kcache_ops
from test_cuda_emu import race_exe  # noqa: F401  (the fixture: the race-checking build)
from test_cuda_emu import (SMS, run_gather_rows, run_lowbit_tail, run_qk_topn, run_reuse_rows,
                           run_sparse_attn_v)

# test (file::name, or file::name[id] for one case) -> why the emulator cannot run it as the CUDA
# op would
KNOWN = {
    "test_reuse_rows.py::test_no_entries": "N = 0: the CUDA launcher zeroes the counts itself "
                                           "and launches nothing",
    "test_reuse_rows.py::test_pool_sharing_memory_is_refused": "an argument check (launcher)",
    "test_reuse_rows.py::test_pool_smaller_than_a_step_is_refused": "an argument check "
                                                                     "(launcher)",
    "test_reuse_rows.py::test_rows_requiring_grad_are_refused": "an argument check (the op's "
                                                                "Autograd kernel, swapped out here)",
    "test_reuse_rows.py::test_the_pool_is_written_in_place_as_autograd_knows_it": "autograd's "
        "in-place bookkeeping (the op's Autograd and ADInplaceOrView kernels, swapped out here)",
    "test_reuse_rows.py::test_rows_as_a_negated_or_conjugated_view_are_refused": "an argument "
        "check (the Python wrapper's, swapped out here)",
    "test_lowbit_tail.py::test_weights_at_the_float_limits": "its tolerance is the device's (the "
        "tensor cores' tf32 floor on CUDA): test_cuda_emu.py runs its case on the kernel",
    "test_lowbit_tail.py::test_compile_decode_step_with_tail": "torch.compile of the op: the "
                                                               "emulated call is not an op",
    "test_qk_topn.py::test_bfloat16_at_the_ends_of_the_range_as_reference[cpu-overflow]": "the "
        "CPU op's NaN (inf - inf) is the kernel's inf (its fmaf chain): test_cuda_emu.py's "
        "test_qk_topn_opposite_products_past_the_float_range checks that",
}


def pytest_collection_modifyitems(config, items):
    """Keep the cases on the "cpu" device, but KNOWN."""
    keep, drop = [], []
    for item in items:
        known = {f"{item.path.name}::{item.originalname}", f"{item.path.name}::{item.name}"}
        on_cpu = getattr(item, "callspec", None) and item.callspec.params.get("device") == "cpu"
        (keep if on_cpu and not known & KNOWN.keys() else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def _qk_topn(exe):
    def run(q, k_cache, seq_lens, n, scale=None, group_select=False, check_values=True,
            return_scores=False, skip_first=0, skip_last=0, top_p=1.0):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out = run_qk_topn(exe, q, k_cache, seq_lens, int(n), float(scale), bool(group_select),
                          return_scores=bool(return_scores), skip_first=int(skip_first),
                          skip_last=int(skip_last), top_p=float(top_p))
        if return_scores:  # every [B, Hq, S]: the CPU's -inf past L_b (undefined on CUDA)
            S = k_cache.shape[2]
            lens = seq_lens.long().clamp(0, S)  # [B]
            out[3].masked_fill_(torch.arange(S)[None, None, :] >= lens[:, None, None],
                                float("-inf"))
        return out
    return run


def _host_read_sms(by_default):
    """The multiprocessors the CUDA launcher plans a host read over (launch_utils.cpp's
    host_read_sms): all where KCACHE_OPS_HOST_READ_SPREAD is 1, or unset and the op spreads by
    default, else 1. (V in device memory, which the launcher never spreads, is a CPU tensor here
    like host V.)"""
    value = os.environ.get("KCACHE_OPS_HOST_READ_SPREAD", "")
    return SMS if value == "1" or (value == "" and by_default) else 1


def _sparse_attn_v(exe):
    def run(scores, indices, v_cache, lse=None, renormalize=True, check_values=True, v_sum=None,
            seq_lens=None):
        return run_sparse_attn_v(exe, scores, indices, v_cache, lse, bool(renormalize),
                                 v_sum=v_sum, seq_lens=seq_lens,
                                 sms=_host_read_sms(False))  # [B, Hq, D]
    return run


def _gather_rows(exe):
    def run(src, indices, check_values=True):
        return run_gather_rows(exe, src, indices, sms=_host_read_sms(True))  # [B, H, N, D]
    return run


def _reuse_rows(exe):
    def run(indices, v_host, new_pos, rows, held, used, step, group_select, check_values=True):
        pool_indices, counts, pool = run_reuse_rows(exe, indices, v_host, new_pos,
                                                    [rows, held, used], int(step[0]),
                                                    bool(group_select))
        for t, after in zip((rows, held, used), pool):  # the op updates the pool in place
            t.copy_(after.view(t.shape))
        return pool_indices, counts  # [B, Hq, N], [B, Hkv, 2]
    return run


def _lowbit_tail(exe):
    def run(scores, seq_lens, lse, indices, v_codes, v_meta, bits, check_values=True,
            skip_first=0, skip_last=0, hot_v=None, hot_pos=None):
        return run_lowbit_tail(exe, scores.contiguous(), seq_lens, lse, indices, v_codes, v_meta,
                               bits, skip_first=skip_first, skip_last=skip_last, hot_v=hot_v,
                               hot_pos=hot_pos)  # [B, Hq, D]
    return run


OPS = {"qk_topn": _qk_topn, "sparse_attn_v": _sparse_attn_v, "gather_rows": _gather_rows,
       "reuse_rows": _reuse_rows, "lowbit_tail": _lowbit_tail}


@pytest.fixture(autouse=True)
def on_emulator(race_exe, monkeypatch):  # noqa: F811
    """Every op the plugin knows, its emulated kernel in place of kcache_ops.<op>."""
    for name, make in OPS.items():
        monkeypatch.setattr(kcache_ops, name, make(race_exe))
