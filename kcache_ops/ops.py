"""Public functions over the kcache_ops::* operators, with their shapes, and the fake (meta)
implementations that let torch.compile and torch.library.opcheck trace them. The functions take
each scalar argument of any type that holds one of its kind (kcache_ops.integers: a NumPy number, a
0-d tensor; under torch.compile a Python one) and refuse another kind with a TypeError (a bool
for a count, an int for a flag)."""
import math

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .integers import as_bool, as_int, as_real


def qk_topn(q, k_cache, seq_lens, n, scale=None, group_select=False, check_values=True,
            return_scores=False, skip_first=0, skip_last=0, top_p=1.0):
    """Exact scores ``scale * q·Kᵀ`` over all valid keys, and the top ``n`` of them.

    Parameters
    ----------
    q : Tensor [B, Hq, D]
        Query of the decode step (float32, float16 or bfloat16; D in {64, 128}). A score past
        float32's range overflows (to inf, or to NaN where products of both signs do, making the
        row's ``lse`` NaN), as in the reference but for bfloat16 on a CPU with AVX-512 BF16, whose
        dot product may give another non-finite score, and on CUDA, whose fused multiply-adds
        over a 16-byte piece of a row round a product only as they add it (1e40 then -1e40
        there: inf, or -inf in the other order, where the reference adds two rounded products,
        inf - inf: NaN): finite outputs need finite scores.
    k_cache : Tensor [B, Hkv, S, D]
        Keys, same dtype and device as ``q``; ``Hq`` must be a multiple of ``Hkv`` (GQA). On CUDA
        ``S <= 2^30`` and ``B, Hq < 65536``.
    seq_lens : Tensor [B] int32
        Valid keys per sequence, ``0 <= L_b <= S``.
    n : int
        How many entries to keep per head (>= 1; on CUDA at most 4096, ``caches.MAX_TOPN``; on
        the CPU, outputs past the free host memory are refused, naming the bytes).
    scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    group_select : bool
        False: each query head keeps its own top ``n``. True: one index set per KV head, ranked by
        the attention mass the key carries for the whole group, ``Σ_h exp(s_h − lse_h)`` (on
        CUDA for groups of at most 128 heads). The mass is a float32 sum: keys whose every
        ``s_h − lse_h`` is below about −103 carry 0 there, tie, and rank by index (their weights
        round to 0 in the output). With ``top_p`` below 1 each head then cuts that shared list to
        its own prefix, so the heads of a group may keep different lengths.
    check_values : bool
        True: a ``seq_lens`` value outside ``[0, S]`` raises an error naming it. On CUDA this reads
        the values back, a device→host synchronisation per call (also skipped under CUDA graph
        capture and with ``KCACHE_OPS_VALIDATE=0``). False skips that read-back on CUDA: the kernels
        clamp each length to ``[0, S]``, so nothing is read out of bounds, but a bad length is not
        reported. The CPU path always checks (it reads the values on the host anyway).
    return_scores : bool
        True: also return every score (for :func:`lowbit_tail`, which then need not read K
        again). On CUDA this is the score pass's own scratch, kept instead of freed: no extra
        work.
    skip_first, skip_last : int >= 0
        Rank only the keys ``skip_first <= j < L_b − skip_last`` (KCache's cold rows: its hot
        rows, the first and the last positions, are attended from the device); ``lse`` and
        ``all_scores`` still cover every ``j < L_b``.
    top_p : float in (0, 1], as a float32
        Below 1: an adaptive budget — each head keeps only the shortest prefix of its ``n``
        entries (in their order) whose full-softmax mass ``Σ exp(s − lse)`` (a NaN term counting
        0) reaches ``top_p``; the entries after it become padding. The first entry is always
        kept. 1 (or a value that rounds to 1 in float32) keeps all ``n``.

    Returns
    -------
    scores : Tensor [B, Hq, n] float32
        Scores at the selected keys, descending (by group mass in group mode), ties to the lower
        index; padding (fewer than ``n`` ranked keys, or past the ``top_p`` prefix) is ``-inf``.
    indices : Tensor [B, Hq, n] int32
        Key positions, ``-1`` for padding.
    lse : Tensor [B, Hq] float32
        ``log Σ_{j<L_b} exp(s_j)`` over all valid keys (``-inf`` when ``L_b = 0``).
    all_scores : Tensor [B, Hq, S] float32, only with ``return_scores``
        ``s_j`` of every key ``j < L_b`` (the same values as ``scores``); entries ``j >= L_b`` are
        ``-inf`` on the CPU and undefined on CUDA (the score pass's scratch). Its rows are 16-byte
        aligned: a view of ``[B, Hq, S rounded up to 4]``.
    """
    check_tensors("qk_topn", q=q, k_cache=k_cache, seq_lens=seq_lens)
    if scale is None:  # a q of no dims or D = 0 reaches the op, whose shape check names it
        scale = 1.0 / math.sqrt(max(q.shape[-1], 1)) if q.dim() else 1.0
    n, skip_first, skip_last = _scalars("qk_topn", as_int, n=n, skip_first=skip_first,
                                        skip_last=skip_last)
    scale, top_p = _scalars("qk_topn", as_real, scale=scale, top_p=top_p)
    group_select, check_values, return_scores = _scalars(
        "qk_topn", as_bool, group_select=group_select, check_values=check_values,
        return_scores=return_scores)
    out = torch.ops.kcache_ops.qk_topn(q, k_cache, seq_lens, n, scale, group_select, check_values,
                                       return_scores, skip_first, skip_last, top_p)
    return out if return_scores else out[:3]


def sparse_attn_v(scores, indices, v_cache, lse=None, renormalize=True, check_values=True,
                  v_sum=None, seq_lens=None):
    """Attention output from the selected V rows, optionally with the mean tail.

    Parameters
    ----------
    scores : Tensor [B, Hq, N] float32
        On CUDA ``B < 65536`` and ``N < 2^24``.
    indices : Tensor [B, Hq, N] int32
        Rows of ``v_cache`` per head, ``-1`` for padding (ignored).
    v_cache : Tensor [B, Hkv, S, D]
        On the CUDA path: pinned, device-mapped host memory (see :func:`alloc_host`), read by the
        kernel directly, or a tensor on the same GPU. On the CPU path: a CPU tensor.
    lse : Tensor [B, Hq] float32, optional
        Needed when ``renormalize=False``.
    renormalize : bool
        True: softmax over the valid selected scores. False: ``exp(score − lse)``, the weights of
        the full softmax (the mass outside the top N is dropped, unless the mean tail adds it).
    check_values : bool
        True: an index outside ``[-1, S)`` (with the mean tail, outside ``[-1, L_b)`` for
        sequence ``b``) or a ``seq_lens`` value outside ``[0, S]`` raises an error naming it. On
        CUDA this reads the values back, a device→host synchronisation per call (also skipped
        under CUDA graph capture and with ``KCACHE_OPS_VALIDATE=0``). False skips that read-back
        on CUDA: the kernel skips every index outside ``[0, S)`` like padding and clamps each
        length to ``[0, S]``, so nothing is read out of bounds, but a bad value is not reported
        (an index in ``[L_b, S)`` counts as a selected row). The CPU path always checks.
    v_sum : Tensor [B, Hkv, D] float32, optional
        The sum of the V rows ``j < L_b`` per sequence and KV head, on the device of ``scores``.
        Given with ``seq_lens`` (and ``renormalize=False``), the mean tail is added: the mass the
        selected rows miss, ``1 − Σ_i p_i`` (clamped at 0), times the mean of the rows not
        selected, ``(v_sum − Σ_i v_i) / (L_b − n)`` over the ``n`` valid entries; nothing where
        ``L_b <= n``. The rows are read once (the sum of the selected rows comes from the same
        reads). A head's indices are taken to be distinct rows, as ``qk_topn`` gives them: a row
        given twice counts twice in both sums.
    seq_lens : Tensor [B] int32, optional
        Valid rows per sequence ``L_b``, on the device of ``scores``; given with ``v_sum``.

    Returns
    -------
    out : Tensor [B, Hq, D], dtype of ``v_cache``, on the device of ``scores``
        ``Σ_i p_i · v_cache[b, h / G, indices_i]`` (plus the mean tail); zeros for a head with no
        valid entry and no tail.
    """
    check_tensors("sparse_attn_v", scores=scores, indices=indices, v_cache=v_cache)
    check_optional_tensors("sparse_attn_v", lse=lse, v_sum=v_sum, seq_lens=seq_lens)
    renormalize, check_values = _scalars("sparse_attn_v", as_bool, renormalize=renormalize,
                                         check_values=check_values)
    return torch.ops.kcache_ops.sparse_attn_v(scores, indices, v_cache, lse, renormalize,
                                              check_values, v_sum, seq_lens)


def gather_rows(src, indices, check_values=True):
    """Gather rows of ``src`` per head: ``dst[b, h, i] = src[b, h / G, indices[b, h, i]]``.

    Parameters
    ----------
    src : Tensor [B, Hs, S, D], any dtype (rows are copied as bytes)
        On the CUDA path: pinned, device-mapped host memory, read zero-copy in 16-byte pieces
        (rows of a multiple of 16 bytes, 16-byte aligned, under 2 GiB).
    indices : Tensor [B, H, N] int32
        ``H`` a multiple of ``Hs``; ``-1`` gives a zero row.
    check_values : bool
        True: an index outside ``[-1, S)`` raises an error naming it. On CUDA this reads the
        values back, a device→host synchronisation per call (also skipped under CUDA graph capture
        and with ``KCACHE_OPS_VALIDATE=0``). False skips that read-back on CUDA: the kernel gives a
        zero row for such an index, so nothing is read out of bounds, but it is not reported. The
        CPU path always checks (it reads the values on the host anyway).

    Returns
    -------
    dst : Tensor [B, H, N, D], dtype of ``src``, on the device of ``indices``
    """
    check_tensors("gather_rows", src=src, indices=indices)
    [check_values] = _scalars("gather_rows", as_bool, check_values=check_values)
    return torch.ops.kcache_ops.gather_rows(src, indices, check_values)


def reuse_rows(indices, v_host, new_pos, rows, held, used, step, group_select,
               check_values=True):
    """One decode step of KCache's pool of reused V rows (DESIGN.md §7; ``KCacheOptions.reuse``):
    the rows a step selected, found in the pool or read from host RAM into it, and where each
    lies. A position's V never changes while its sequence lives, so attending over the pool at
    ``pool_indices`` gives the output of attending over ``v_host`` at ``indices``.

    The step reads, per (sequence, KV head), the positions of its E entries: per head the G
    heads' N indices one after another (E = G·N); with ``group_select`` the group's one list
    (E = N), the entry-wise max over its heads (``top_p`` may cut each head to a prefix of it).
    Each distinct position, in the order of its first entry, is either found (the first slot
    whose ``held`` is it) or read from ``v_host`` into the next slot in refill order: the slots
    not found this step, ascending by ``used`` (the step each was last read, -1 never; below -1
    counts as -1), ties to the lower slot. Every slot read gets ``used = step``; a row read for
    the step's new token (``new_pos``) serves this step only (its slot's ``held`` and ``used``
    become -1), so that a step run again with another token finds no stale row. The pool must
    not hold ``new_pos`` before the step (KCache's never does: a prefill empties it, and a new
    token's slot is emptied after its step): a row found there would be read. On CUDA: one
    launch, no host synchronisation with ``check_values=False``, safe to capture in a CUDA graph
    (the step number is read on the device). As torch's own in-place ops do, it bumps the version
    counters of ``rows``, ``held`` and ``used``; it refuses ``rows`` that require grad where grad
    mode is on, and a pool of inference tensors outside ``torch.inference_mode``.

    Parameters
    ----------
    indices : Tensor [B, Hq, N] int32
        The step's selection (``qk_topn``'s indices), -1 for padding.
    v_host : Tensor [B, Hkv, S, D]
        V, as :func:`sparse_attn_v` takes it (on CUDA: pinned, device-mapped host memory or a
        tensor on the same GPU, rows a multiple of 16 bytes and under 2 GiB).
    new_pos : Tensor [B] int32
        The position of each sequence's new token.
    rows : Tensor [B, Hkv, C, D], dtype of ``v_host``, contiguous, updated
        The pool: slot ``c`` holds V of position ``held[b, h, c]``. ``E <= C < 2^31``; on CUDA at
        most 2048 slots and 2048 entries per (sequence, KV head), and G·N below 2^31.
    held : Tensor [B, Hkv, C] int32, contiguous, updated
        The position each slot holds, -1 none.
    used : Tensor [B, Hkv, C] int32, contiguous, updated
        The step each slot was last read, -1 never. ``rows``, ``held`` and ``used`` share no
        memory with each other or with the inputs (an error names the two that do).
    step : Tensor [1] int32
        This step's number (the caller counts the steps).
    group_select : bool
        Whether ``indices`` come from ``qk_topn(group_select=True)``.
    check_values : bool
        True: an index outside ``[-1, S)`` raises an error naming it (on CUDA a device→host
        synchronisation, skipped under CUDA graph capture and with ``KCACHE_OPS_VALIDATE=0``).
        False: such an index is padding, unreported. The CPU path always checks.

    Returns
    -------
    pool_indices : Tensor [B, Hq, N] int32
        The slot of each entry's row, -1 for padding: :func:`sparse_attn_v`'s indices over
        ``rows``.
    counts : Tensor [B, Hkv, 2] int32
        The distinct positions the step read, and how many of them the pool held.
    """
    check_tensors("reuse_rows", indices=indices, v_host=v_host, new_pos=new_pos, rows=rows,
                  held=held, used=used, step=step)
    # torch would run the op on a resolved copy of one, then fail after writing the others
    # (dynamo cannot trace the test)
    for name, t in (("rows", rows), ("held", held), ("used", used)):
        if not torch.compiler.is_compiling() and (t.is_neg() or t.is_conj()):
            raise ValueError(f"reuse_rows: {name} must not be a lazily negated or conjugated view"
                             f" (the op writes it in place), got is_neg() {t.is_neg()}, is_conj()"
                             f" {t.is_conj()}")
    group_select, check_values = _scalars("reuse_rows", as_bool, group_select=group_select,
                                          check_values=check_values)
    return torch.ops.kcache_ops.reuse_rows(indices, v_host, new_pos, rows, held, used, step,
                                           group_select, check_values)


def lowbit_tail(scores, seq_lens, lse, indices, v_codes, v_meta, bits, check_values=True,
                skip_first=0, skip_last=0, hot_v=None, hot_pos=None):
    """The low-bit tail: the attention of every valid key a head did not select, with its exact
    full-softmax weight, over the low-bit copy of V (the unread rows' share of the output).

    It reads the scores, not K: ``qk_topn(..., return_scores=True)`` gives them from the pass that
    selected the rows (on CUDA its scratch, 4 bytes per key and query head where K is
    ``2 · D / G`` bytes).

    Parameters
    ----------
    scores : Tensor [B, Hq, S] float32
        Every score ``s_j = scale · q·k_j``: ``all_scores`` of :func:`qk_topn`; entries
        ``j >= L_b`` are never read. On CUDA ``S <= 2^30``, ``B, Hq < 65536`` and ``N < 2^24``.
    seq_lens : Tensor [B] int32
        Valid keys per sequence, ``0 <= L_b <= S``; rows ``j >= L_b`` are never read.
    lse : Tensor [B, Hq] float32
        ``log Σ_{j<L_b} exp(s_j)`` from :func:`qk_topn`.
    indices : Tensor [B, Hq, N] int32
        The keys each head selected (read exactly from host), ``-1`` for padding; they are left
        out of the tail.
    v_codes : Tensor [B, Hkv, S, D * bits / 8] uint8
        The low-bit copy of V (from :func:`quantize_rows`; ``Hq`` a multiple of ``Hkv``, D 64 or
        128), on the device of ``scores``.
    v_meta : Tensor [B, Hkv, S, 2] bfloat16
        Per row ``(scale, min)``: ``v_d = min + scale · code_d``.
    bits : int
        2 or 4, the code width ``v_codes`` was written with.
    check_values : bool
        True: a ``seq_lens`` value outside ``[0, S]`` or an index outside ``[-1, S)`` raises an
        error naming it. On CUDA this reads the values back, a device→host synchronisation per
        call (also skipped under CUDA graph capture and with ``KCACHE_OPS_VALIDATE=0``). False
        skips that read-back on CUDA: the kernel clamps each length to ``[0, S]`` and ignores
        every index outside ``[0, L_b)``, so nothing is read out of bounds, but a bad value is not
        reported. The CPU path always checks.
    skip_first, skip_last : int >= 0
        Also leave out the keys ``j < skip_first`` and ``j >= L_b − skip_last``, as if every head
        had selected them: KCache's hot rows, attended exactly from the device (the counts
        :func:`qk_topn` skipped in its ranking).
    hot_v : Tensor [B, Hkv, H, D] float32, float16 or bfloat16, optional
        Rows of V kept exactly on the device (KCache's hot rows; contiguous in D), added with
        their exact weights in the same call, so that a decode step needs no separate ops for
        them. Given with ``hot_pos``.
    hot_pos : Tensor [B, H] int32, optional
        The position of each row of ``hot_v``: slot ``i`` adds ``exp(s_pos − lse) ·
        hot_v[b, h / G, i]`` where ``0 <= pos < L_b`` (-1: an empty slot, left out). Checked
        like ``indices`` (values in ``[-1, S)``) when ``check_values``.

    Returns
    -------
    out : Tensor [B, Hq, D] float32
        ``Σ_{skip_first <= j < L_b − skip_last, j ∉ indices[b, h]} exp(s_j − lse) ·
        dequant(v)[b, h / G, j]``, plus the hot rows' part; zeros where no such key is left
        (every one selected or skipped, or ``L_b = 0``) and no hot row is given. On CUDA the
        ``w · scale · code`` sums run on the tensor cores in tf32, each ``w · scale`` in two tf32
        parts: within 2⁻²¹ of float32 per term, but a term below about 2⁻¹¹² is a subnormal there
        and counts within 2⁻¹³³ of itself (the float32 outputs that small are subnormals too).
    """
    check_tensors("lowbit_tail", scores=scores, seq_lens=seq_lens, lse=lse, indices=indices,
                  v_codes=v_codes, v_meta=v_meta)
    check_optional_tensors("lowbit_tail", hot_v=hot_v, hot_pos=hot_pos)
    bits, skip_first, skip_last = _scalars("lowbit_tail", as_int, bits=bits,
                                           skip_first=skip_first, skip_last=skip_last)
    [check_values] = _scalars("lowbit_tail", as_bool, check_values=check_values)
    return torch.ops.kcache_ops.lowbit_tail(scores, seq_lens, lse, indices, v_codes, v_meta,
                                            bits, check_values, skip_first, skip_last, hot_v,
                                            hot_pos)


def alloc_host(shape, dtype):
    """A pinned, device-mapped CPU tensor of ``shape`` and ``dtype`` (uninitialised).

    Where no GPU is present (or the build is CPU-only) it is an ordinary CPU tensor. The memory is
    freed when the tensor dies. A failed allocation raises an error naming the bytes asked for.
    """
    # one size of any integer type (a NumPy one, a 0-d tensor) as torch.empty(5) takes 5, or a
    # sequence of them (a list, a tuple, a 1-d array or tensor); a bool is none
    one = hasattr(shape, "__index__") and getattr(shape, "ndim", 0) == 0
    if one or not hasattr(shape, "__iter__"):  # not a sequence (a float, say): named as a size
        shape = _scalars("alloc_host", as_int, shape=shape)
    else:
        shape = _scalars("alloc_host", as_int, **{f"shape[{i}]": s for i, s in enumerate(shape)})
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"alloc_host: dtype must be a torch.dtype, got {dtype!r}")
    return torch.ops.kcache_ops.alloc_host(shape, dtype)


def host_bytes_available():
    """Bytes of host RAM available for :func:`alloc_host` (MemAvailable of /proc/meminfo), or None
    where the machine does not report it. The same number ``alloc_host``'s error message quotes."""
    available = torch.ops.kcache_ops.host_bytes_available()
    return None if available < 0 else available


def quantize_rows(v, bits):
    """Each row of ``v`` to ``bits``-bit codes with its own scale and min (asymmetric min/max):
    the low-bit copy of V that the ``int2`` / ``int4`` tail reads.

    ``scale = (max − min) / (2^bits − 1)`` and ``min`` are rounded to bfloat16 first (a zero one
    taken as +0, whichever signs the row's zeros have); then
    ``code_d = clamp(round_half_even((v_d − min) / scale), 0, 2^bits − 1)`` in float32 with the
    rounded values (0 where scale is 0), code ``d`` in byte ``d // (8 / bits)`` at bit
    ``(d % (8 / bits)) * bits``; bit for bit :func:`kcache_ops.reference.quantize_rows` on
    finite input.
    ``min + scale · code`` is within ``scale / 2`` of ``v`` up to the bfloat16 rounding of scale
    and min. A finite row's max and min are first clamped to ``±2^125`` (``reference.QUANT_RANGE``,
    ≈ 4.25e37): so scale, min and every dequantised value stay finite, and so does the low-bit
    tail, however large finite V is (a value beyond gets an end code). On CUDA: one launch, no host
    synchronisation, safe to capture in a CUDA graph.

    Non-finite input never makes the op fail or read out of bounds (the reference differs here):
    NaN elements are left out of the row's min and max and get code 0 (a row of NaN only gets
    scale -inf, min +inf and codes 0); an infinite element makes the row's scale infinite (NaN
    when every element is the same infinity), its min -inf where one is -inf, and its codes
    meaningless. Every code stays in ``[0, 2^bits − 1]``; the CPU and CUDA ops give the same
    codes and meta (a NaN scale may differ in its payload bits).

    Parameters
    ----------
    v : Tensor [..., D]
        float32, float16 or bfloat16, at least 1 dim, any strides but a contiguous last dim;
        ``D`` a positive multiple of ``8 / bits`` (4 for 2 bits, 2 for 4 bits); on CUDA
        ``D <= 2^30``.
    bits : int
        2 or 4.

    Returns
    -------
    codes : Tensor [..., D * bits / 8] uint8, contiguous, on the device of ``v``
    meta : Tensor [..., 2] bfloat16, contiguous, on the device of ``v``
        ``(scale, min)`` of each row.
    """
    check_tensors("quantize_rows", v=v)
    [bits] = _scalars("quantize_rows", as_int, bits=bits)
    return torch.ops.kcache_ops.quantize_rows(v, bits)


def built_with_cuda():
    """True when the loaded kcache_ops._C was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("kcache_ops::qk_topn", "CUDA")


# what each converter of kcache_ops.integers takes, for _scalars' message
_KINDS = {as_int: "an integer (an int, a NumPy integer or a 0-d integer tensor)",
          as_real: "a real number (an int, a float, a NumPy number or a 0-d tensor)",
          as_bool: "a bool (a Python or NumPy bool or a 0-d bool tensor)"}


def check_tensors(owner, **tensors):
    """TypeError naming the first of the required ``tensors`` (name -> value) of ``owner`` (an
    op's wrapper, a cache) that is not a tensor, or not a dense one: an op's schema would take
    None as an undefined tensor (a shape check then says "got shape [0]", or no kernel is found
    where no argument is a tensor), a cache would fail on a missing attribute, and torch's
    dispatcher finds no kernel for a sparse, nested or quantized tensor, naming no argument."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            kind = type(t).__qualname__ if type(t).__module__ == "builtins" else \
                f"{type(t).__module__}.{type(t).__qualname__}"
            got = "None" if t is None else f"an object of type {kind}"
            raise TypeError(f"{owner}: {name} must be a tensor, got {got}")
        if t.layout != torch.strided or t.is_nested:  # torch's error names no argument
            raise TypeError(f"{owner}: {name} must be a dense (strided) tensor, got layout "
                            f"{t.layout}{' (nested)' if t.is_nested else ''}")
        if t.is_quantized:  # strided, but torch's dispatcher finds no kernel either
            raise TypeError(f"{owner}: {name} must not be a quantized tensor, got dtype {t.dtype}")


def check_optional_tensors(owner, **tensors):
    """:func:`check_tensors` for the optional tensor arguments of ``owner``: those given (not
    None)."""
    check_tensors(owner, **{name: t for name, t in tensors.items() if t is not None})


# What torch.compile passes for a Python scalar argument: the value, or a symbol for it.
_TRACED_SCALARS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)
_TRACED_KINDS = {as_int: "a Python int", as_real: "a Python int or float", as_bool: "a Python bool"}


def _scalars(op, convert, **values):
    """The scalar arguments ``values`` (name -> value) of the wrapper of ``op``, converted by
    ``convert`` (as_int, as_real or as_bool), as a list in their order; TypeError naming the
    first that is not of its kind, or under torch.compile not a Python scalar (ValueError for an
    integer past int64, which the schema's parser refuses without naming it). torch's schema
    would take a bool as an int (``n=True`` as 1) and an int as a bool, and ``float()`` a
    string."""
    out = []
    for name, value in values.items():
        if torch.compiler.is_dynamo_compiling() and type(value) not in _TRACED_SCALARS:
            # a NumPy scalar fails in Dynamo, a 0-d tensor becomes a symbol the schema refuses,
            # both deep in torch; with fullgraph=False this is a graph break, and eager takes it
            raise TypeError(f"{op}: {name} must be {_TRACED_KINDS[convert]} under torch.compile "
                            f"(NumPy and tensor scalars are taken in eager mode only), got "
                            f"{type(value).__name__}")
        converted = convert(value)
        if converted is None:
            raise TypeError(f"{op}: {name} must be {_KINDS[convert]}, got {value!r}")
        if type(converted) is int and not -2**63 <= converted < 2**63:  # not a traced SymInt
            raise ValueError(f"{op}: {name} must fit in int64, the schema's int, got {converted}")
        out.append(converted)
    return out


def _exact_text(x):
    """The float ``x`` as the eager ops' messages write it (csrc/checks.h's exact_text: C++'s
    std::to_chars, the shortest text that reads back as ``x``, fixed or scientific, whichever is
    shorter, fixed on a tie, an integer's fixed text exact): 0, 2, 0.5, 1e-07, 1e+05."""
    x = float(x)
    if math.isnan(x):  # C++ writes the sign bit of a NaN
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    if math.isinf(x):
        return repr(x)  # inf, -inf
    fixed = str(int(x)) if x.is_integer() and x != 0 else \
        np.format_float_positional(x, trim="-")
    scientific = np.format_float_scientific(x, trim="-", exp_digits=2)
    return fixed if len(fixed) <= len(scientific) else scientific


def as_float32(x):
    """x rounded to float32, as the ops take a float argument such as top_p (their schema's float
    is a double, which they compare in float32)."""
    return float(torch.tensor(x, dtype=torch.float32, device="cpu"))


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes of q, K and V
HEAD_DIMS = (64, 128)  # the head dims D of the kernels
# kMaxTopN in csrc/cuda/qk_topn_kernel.cuh: the CUDA select sorts at most this many candidates per
# head in shared memory, so N may not exceed it on a CUDA device (the CPU path has no limit).
MAX_TOPN = 4096
# the largest reuse pool, and step (G·N, or N with group_select), per sequence and KV head on CUDA:
# what one block of kcache_ops.reuse_rows holds in shared memory (kReuseMaxSlots, kReuseMaxEntries)
MAX_REUSE = 2048
# kMaxGroupSelect in csrc/cuda/qk_topn_kernel.cuh: the query heads per KV head the CUDA select
# ranks together with group_select (their lse in shared memory)
MAX_GROUP_SELECT = 128


# The dtypes the eager ops' messages spell as Python does (csrc/checks.h's dtype_name)
_SPELLED = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
            torch.int16, torch.int32, torch.int64, torch.bool)


def _dtype_name(dtype):
    """``dtype`` as the eager ops' messages name it: float32, int64, ... (c10's name for the rarer
    ones: ComplexFloat, ...)."""
    if dtype in _SPELLED:
        return str(dtype).removeprefix("torch.")
    return torch.empty(0, dtype=dtype, device="meta").type().rsplit(".", 1)[1].removesuffix(
        "Tensor")


def _check_dtype(op, name, t, dtype):
    """``t`` (the argument ``name``) has ``dtype``, one of them for a tuple, any for None."""
    if isinstance(dtype, tuple) and t.dtype not in dtype:
        *others, last = (str(d).removeprefix("torch.") for d in dtype)
        raise RuntimeError(f"{op}: {name} must be {', '.join(others)} or {last}, got "
                           f"{_dtype_name(t.dtype)}")
    if isinstance(dtype, torch.dtype) and t.dtype != dtype:
        raise RuntimeError(f"{op}: {name} must be {_dtype_name(dtype)}, got "
                           f"{_dtype_name(t.dtype)}")


def _check_same_dtype(op, a_name, a, b_name, b):
    if a.dtype != b.dtype:
        raise RuntimeError(f"{op}: {a_name} and {b_name} must have the same dtype, got "
                           f"{_dtype_name(a.dtype)} and {_dtype_name(b.dtype)}")


def _values(sizes):
    """A size, or a shape as a list, as the numbers a fake implementation's error shows: a size
    traced as a symbol under torch.compile's dynamic shapes by its value (as "s3" it would say
    nothing; the error ends the trace, so the guard this adds costs nothing)."""
    if isinstance(sizes, (torch.SymInt, int)):
        return int(sizes)
    return [int(n) for n in sizes]


def _check_cuda_sizes(op, ok, limits, **sizes):
    """A CUDA op's check that its sizes fit its kernels' int arithmetic (csrc/cuda/<op>.cu), with
    its message: ``limits`` says which, ``sizes`` (name=size) what the call has."""
    if not ok:
        raise RuntimeError(f"{op}: sizes out of range for {limits}: "
                           + ", ".join(f"{name}={_values(n)}" for name, n in sizes.items()))


def _check_head_dim(op, name, d):
    if d not in HEAD_DIMS:
        raise RuntimeError(f"{op}: {name}: head dim must be 64 or 128, got {_values(d)}")


def _check_last_contiguous(op, **tensors):
    """Each of ``tensors`` (name -> tensor of at least 1 dim, or None) contiguous in its last dim,
    as the kernels read its rows."""
    for name, t in tensors.items():
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise RuntimeError(f"{op}: {name} must be contiguous in its last dim, got strides "
                               f"{_values(t.stride())}")


def _check_no_overlap(op, written, read):
    """The eager op's check that no tensor of ``written`` (name -> tensor, updated in place)
    shares memory with another of them or one of ``read`` (name -> tensor), on fake tensors:
    views of one storage whose byte spans (first element to last) overlap. Under torch.compile the
    op runs on copies of what it writes, where the eager check would find nothing."""
    def span(t):  # (storage, first byte, one past the last), None for an empty tensor
        if t.numel() == 0:
            return None
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        first = t.storage_offset() * t.element_size()
        return StorageWeakRef(t.untyped_storage()), first, first + (last + 1) * t.element_size()

    names = list(written)
    for i, name in enumerate(names):
        w = span(written[name])
        for other, t in [*((n, written[n]) for n in names[i + 1:]), *read.items()]:
            o = span(t)
            # the storages compared first: a size compared adds a guard under dynamic shapes
            if w and o and w[0] == o[0] and w[1] < o[2] and o[1] < w[2]:
                raise RuntimeError(f"{op}: {name} and {other} must not share memory ({name} is "
                                   "updated in place), got views of the same memory")


def _check_fake(op, args, host=(), group=None, host_only=()):
    """The checks of an eager op that its fake implementation needs on each tensor argument, with
    messages that name the argument, the expected and the actual: each tensor of ``args`` (name ->
    (tensor or None, dims, dtype)) has that many dims, a dim named twice has one size throughout
    (dims name each dim, e.g. ("B", "Hq", "D"), or give its size), and it has ``dtype`` (as
    :func:`_check_dtype` takes it); each is on the device of the first, but those named in
    ``host`` (V in host RAM), which may be on the CPU instead, and those in ``host_only``, which
    must be (gather_rows' src: its CUDA op reads host memory only); ``group`` (query heads, KV
    heads) names two dims whose first is a multiple of the second. Without them a bad argument fails
    deep in the fake, or is traced into a graph the eager op refuses only when it runs, and a
    meta argument among real ones would give uninitialised outputs on the device of the others."""
    (first_name, (first, *_)), *_ = args.items()
    sizes = {}  # dim name -> (size, the argument it was first seen in)
    for name, (t, dims, dtype) in args.items():
        if t is None:
            continue
        if t.dim() != len(dims):
            raise RuntimeError(f"{op}: {name} must have {len(dims)} dims, got shape "
                               f"{_values(t.shape)}")
        _check_dtype(op, name, t, dtype)
        on_host = t.device.type == "cpu" or t.device.type == first.device.type == "meta"
        if name in host_only and not on_host:  # all on meta: the shapes alone
            raise RuntimeError(f"{op}: {name} must be in host memory (on cpu), got {t.device}")
        if name in host and t.device.type != "cpu" and t.device != first.device:
            also = ("" if first.device.type == "cpu"
                    else f" or on {first.device} (the device of {first_name})")
            raise RuntimeError(f"{op}: {name} must be in host memory (on cpu){also}, got "
                               f"{t.device}")
        if name not in host + host_only and t.device != first.device:
            raise RuntimeError(f"{op}: {name} must be on {first.device} (the device of "
                               f"{first_name}), got {t.device}")
        for i, (dim, size) in enumerate(zip(dims, t.shape)):
            fixed = isinstance(dim, int)
            want, source = (dim, None) if fixed else sizes.setdefault(dim, (size, name))
            if size != want:
                of = "" if fixed else f" ({dim}, as in {source})"
                raise RuntimeError(f"{op}: {name} must have {_values(want)} in dim {i}{of}, "
                                   f"got shape {_values(t.shape)}")
    if group is not None:
        (hq, hq_of), (hkv, hkv_of) = (sizes[dim] for dim in group)
        if hkv == 0 or hq % hkv != 0:
            raise RuntimeError(f"{op}: {hq_of} heads ({_values(hq)}) must be a multiple of "
                               f"{hkv_of} heads ({_values(hkv)})")


def _check_bits(op, bits):
    if bits not in (2, 4):
        raise RuntimeError(f"{op}: bits must be 2 or 4, got {bits}")


def _check_skip(op, skip_first, skip_last):
    for name, count in (("skip_first", skip_first), ("skip_last", skip_last)):
        if not 0 <= count < 1 << 31:
            raise RuntimeError(f"{op}: {name} must be in [0, 2^31), got {count}")


# The fake implementations make every check of the eager ops (csrc/shape_checks.h, the CPU ops'
# device checks, the CUDA ops' limits on N, G, the reuse pool and the sizes) that does not read a
# tensor's values or its address, so that torch.compile refuses a bad call while it traces, and
# meta tensors get shapes only where the eager op would run.


@torch.library.register_fake("kcache_ops::qk_topn")
def _(q, k_cache, seq_lens, n, scale, group_select=False, check_values=True,
      return_scores=False, skip_first=0, skip_last=0, top_p=1.0):
    _check_fake("qk_topn", {"q": (q, ("B", "Hq", "D"), FLOAT_DTYPES),
                            "k_cache": (k_cache, ("B", "Hkv", "S", "D"), None),
                            "seq_lens": (seq_lens, ("B",), torch.int32)}, group=("Hq", "Hkv"))
    _check_same_dtype("qk_topn", "q", q, "k_cache", k_cache)
    _check_head_dim("qk_topn", "q", q.shape[2])
    if not 1 <= n < 1 << 31:
        raise RuntimeError(f"qk_topn: n must be in [1, 2^31), got {n}")
    if not math.isfinite(as_float32(scale)):
        raise RuntimeError(f"qk_topn: scale must be finite (as a float32), got "
                           f"{_exact_text(scale)}")
    _check_skip("qk_topn", skip_first, skip_last)
    if not 0 < as_float32(top_p) <= 1:
        raise RuntimeError(f"qk_topn: top_p must be in (0, 1] (as a float32), got "
                           f"{_exact_text(top_p)}")
    _check_last_contiguous("qk_topn", q=q, k_cache=k_cache)
    B, Hq, _ = q.shape
    S = k_cache.shape[2]
    if q.device.type == "cuda":  # the CUDA op's limits (csrc/cuda/qk_topn.cu)
        if n > MAX_TOPN:
            raise RuntimeError(f"qk_topn: n must be at most {MAX_TOPN} on CUDA, got {n}")
        G = Hq // k_cache.shape[1]
        if group_select and G > MAX_GROUP_SELECT:
            raise RuntimeError(f"qk_topn: group_select supports at most {MAX_GROUP_SELECT} query "
                               f"heads per KV head, got {_values(G)}")
        _check_cuda_sizes("qk_topn", S <= 1 << 30 and B < 65536 and Hq < 65536,
                          "the CUDA kernels (B, Hq < 65536, S <= 2^30)", B=B, Hq=Hq, S=S)
    if return_scores:  # [B, Hq, S] of [B, Hq, S rounded up to 4]
        row = (S + 3) // 4 * 4
        all_scores = q.new_empty((B, Hq, row), dtype=torch.float32)[..., :S]
    else:
        all_scores = q.new_empty((0,), dtype=torch.float32)
    return (q.new_empty((B, Hq, n), dtype=torch.float32),
            q.new_empty((B, Hq, n), dtype=torch.int32),
            q.new_empty((B, Hq), dtype=torch.float32), all_scores)


@torch.library.register_fake("kcache_ops::sparse_attn_v")
def _(scores, indices, v_cache, lse=None, renormalize=True, check_values=True, v_sum=None,
      seq_lens=None):
    if (v_sum is None) != (seq_lens is None):
        raise RuntimeError("sparse_attn_v: v_sum and seq_lens must be given together (the mean "
                           "tail), got " + ("v_sum without seq_lens" if seq_lens is None
                                            else "seq_lens without v_sum"))
    if v_sum is not None and renormalize:
        raise RuntimeError("sparse_attn_v: the mean tail (v_sum) needs renormalize=False, got "
                           "renormalize=True")
    if lse is None and not renormalize:
        raise RuntimeError("sparse_attn_v: lse is required when renormalize=False, got None")
    _check_fake("sparse_attn_v", {"scores": (scores, ("B", "Hq", "N"), torch.float32),
                                  "indices": (indices, ("B", "Hq", "N"), torch.int32),
                                  "v_cache": (v_cache, ("B", "Hkv", "S", "D"), FLOAT_DTYPES),
                                  "lse": (lse, ("B", "Hq"), torch.float32),
                                  "v_sum": (v_sum, ("B", "Hkv", "D"), torch.float32),
                                  "seq_lens": (seq_lens, ("B",), torch.int32)},
                host=("v_cache",), group=("Hq", "Hkv"))
    _check_head_dim("sparse_attn_v", "v_cache", v_cache.shape[3])
    _check_last_contiguous("sparse_attn_v", scores=scores, indices=indices, v_cache=v_cache,
                           v_sum=v_sum)
    B, Hq, N = scores.shape
    S = v_cache.shape[2]
    if scores.device.type == "cuda":
        _check_cuda_sizes("sparse_attn_v", S < 1 << 31 and B < 65536 and N < 1 << 24,
                          "the CUDA kernel (B < 65536, S < 2^31, N < 2^24)", B=B, S=S, N=N)
    return scores.new_empty((B, Hq, v_cache.shape[-1]), dtype=v_cache.dtype)


@torch.library.register_fake("kcache_ops::gather_rows")
def _(src, indices, check_values=True):
    _check_fake("gather_rows", {"indices": (indices, ("B", "H", "N"), torch.int32),
                                "src": (src, ("B", "Hs", "S", "D"), None)},
                host_only=("src",), group=("H", "Hs"))
    _check_last_contiguous("gather_rows", src=src, indices=indices)
    B, H, N = indices.shape
    if indices.device.type == "cuda":
        S, row_bytes = src.shape[2], src.shape[3] * src.element_size()
        _check_cuda_sizes("gather_rows", max(H, S, N, row_bytes) < 1 << 31,
                          "the CUDA kernel (each below 2^31)", H=H, S=S, N=N,
                          **{"a row's bytes": row_bytes})
    return indices.new_empty((B, H, N, src.shape[-1]), dtype=src.dtype)


# The dtypes alloc_host refuses: quantized and bits ones (c10::isQIntType, isBitsType).
_NOT_PLAIN = {getattr(torch, name) for name in ("qint8", "quint8", "qint32", "quint4x2",
                                                "quint2x4", "bits8", "bits16", "bits1x8",
                                                "bits2x4", "bits4x2") if hasattr(torch, name)}


@torch.library.register_fake("kcache_ops::alloc_host")
def _(shape, dtype):
    if dtype in _NOT_PLAIN:
        raise RuntimeError(f"alloc_host: dtype must be a plain (not quantized, not bits) dtype, "
                           f"got {dtype}")
    if any(s < 0 for s in shape):
        raise RuntimeError(f"alloc_host: shape must have no negative size, got {list(shape)}")
    int64_max = 2**63 - 1
    if 0 not in shape and math.prod(shape) * dtype.itemsize > int64_max:
        raise RuntimeError(f"alloc_host: shape {list(shape)} of {dtype} needs more than "
                           f"{int64_max} bytes (its size overflows int64)")
    elements, elements_overflow = 1, False  # as torch: in uint64, a 0 after an overflow too
    for s in shape:
        elements *= s
        elements_overflow = elements_overflow or elements >= 2**64
    if elements_overflow or math.prod(max(s, 1) for s in shape[1:]) > int64_max:
        raise RuntimeError(f"alloc_host: shape {list(shape)} has sizes or strides whose product "
                           f"overflows (as torch computes them)")
    return torch.empty(shape, dtype=dtype, device="cpu")


@torch.library.register_fake("kcache_ops::quantize_rows")
def _(v, bits):
    if v.dim() < 1:
        raise RuntimeError("quantize_rows: v must have at least 1 dim ([..., D]), got a 0-dim "
                           "tensor")
    _check_dtype("quantize_rows", "v", v, FLOAT_DTYPES)
    _check_bits("quantize_rows", bits)
    D, per_byte = v.shape[-1], 8 // bits
    if D <= 0 or D % per_byte != 0:
        raise RuntimeError(f"quantize_rows: v: last dim (D) must be a positive multiple of "
                           f"{per_byte} (8 / bits) for bits={bits}, got {_values(D)}")
    _check_last_contiguous("quantize_rows", v=v)
    lead = v.shape[:-1]
    if v.device.type == "cuda":  # a block's 4 warps quantize a row each (kQuantWarps)
        rows = math.prod(lead)
        _check_cuda_sizes("quantize_rows", D <= 1 << 30 and -(-rows // 4) < 1 << 31,
                          "the CUDA kernel (D <= 2^30, rows below 4 x 2^31)", rows=rows, D=D)
    return (v.new_empty((*lead, D * bits // 8), dtype=torch.uint8),
            v.new_empty((*lead, 2), dtype=torch.bfloat16))


@torch.library.register_fake("kcache_ops::lowbit_tail")
def _(scores, seq_lens, lse, indices, v_codes, v_meta, bits, check_values=True, skip_first=0,
      skip_last=0, hot_v=None, hot_pos=None):
    _check_bits("lowbit_tail", bits)
    _check_skip("lowbit_tail", skip_first, skip_last)
    if (hot_v is None) != (hot_pos is None):
        raise RuntimeError("lowbit_tail: hot_v and hot_pos must be given together, got hot_v "
                           f"{'None' if hot_v is None else 'set'} and hot_pos "
                           f"{'None' if hot_pos is None else 'set'}")
    _check_fake("lowbit_tail", {"scores": (scores, ("B", "Hq", "S"), torch.float32),
                                "seq_lens": (seq_lens, ("B",), torch.int32),
                                "lse": (lse, ("B", "Hq"), torch.float32),
                                "indices": (indices, ("B", "Hq", "N"), torch.int32),
                                "v_codes": (v_codes, ("B", "Hkv", "S", "D * bits / 8"),
                                            torch.uint8),
                                "v_meta": (v_meta, ("B", "Hkv", "S", 2), torch.bfloat16),
                                "hot_v": (hot_v, ("B", "Hkv", "H", "D"), FLOAT_DTYPES),
                                "hot_pos": (hot_pos, ("B", "H"), torch.int32)},
                group=("Hq", "Hkv"))
    code_bytes = v_codes.shape[3]
    D = code_bytes * 8 // bits
    if code_bytes * 8 != D * bits or D not in HEAD_DIMS:
        raise RuntimeError(f"lowbit_tail: v_codes last dim must be D * bits / 8 with D 64 or 128 "
                           f"({64 * bits // 8} or {128 * bits // 8} bytes for bits = {bits}), got "
                           f"{_values(code_bytes)}")
    if hot_v is not None and hot_v.shape[3] != D:
        B, Hkv = _values(v_codes.shape[:2])
        raise RuntimeError(f"lowbit_tail: hot_v must have shape [{B}, {Hkv}, H, {_values(D)}] "
                           f"(scores batch, v_codes heads, -, head dim), got "
                           f"{_values(hot_v.shape)}")
    _check_last_contiguous("lowbit_tail", indices=indices, v_codes=v_codes, v_meta=v_meta,
                           hot_v=hot_v)
    B, Hq, S = scores.shape
    N = indices.shape[2]
    if scores.device.type == "cuda":
        _check_cuda_sizes("lowbit_tail", S <= 1 << 30 and B < 65536 and Hq < 65536 and N < 1 << 24,
                          "the CUDA kernels (B, Hq < 65536, S <= 2^30, N < 2^24)", B=B, Hq=Hq,
                          S=S, N=N)
        if hot_v is not None and hot_v.shape[2] >= 1 << 30:
            raise RuntimeError(f"lowbit_tail: hot_v rows out of range for the CUDA kernels (below "
                               f"2^30): H={_values(hot_v.shape[2])}")
    return scores.new_empty((B, Hq, D))


@torch.library.register_fake("kcache_ops::reuse_rows")
def _(indices, v_host, new_pos, rows, held, used, step, group_select, check_values=True):
    _check_fake("reuse_rows", {"indices": (indices, ("B", "Hq", "N"), torch.int32),
                               "v_host": (v_host, ("B", "Hkv", "S", "D"), None),
                               "new_pos": (new_pos, ("B",), torch.int32),
                               "rows": (rows, ("B", "Hkv", "C", "D"), None),
                               "held": (held, ("B", "Hkv", "C"), torch.int32),
                               "used": (used, ("B", "Hkv", "C"), torch.int32),
                               "step": (step, (1,), torch.int32)},
                host=("v_host",), group=("Hq", "Hkv"))
    _check_same_dtype("reuse_rows", "rows", rows, "v_host", v_host)
    B, Hq, N = indices.shape
    _, Hkv, S, _ = v_host.shape
    E, C = (N if group_select else Hq // Hkv * N), rows.shape[2]
    if C < E:
        raise RuntimeError(f"reuse_rows: rows must have at least {_values(E)} slots (the rows of "
                           f"one step: {'N with group_select' if group_select else 'G x N'}), "
                           f"got {_values(C)}")
    if S >= 1 << 31:
        raise RuntimeError(f"reuse_rows: v_host must have fewer than 2^31 rows, got "
                           f"{_values(S)}")
    if C >= 1 << 31:
        raise RuntimeError(f"reuse_rows: rows must have fewer than 2^31 slots (pool_indices are "
                           f"int32), got {_values(C)}")
    if indices.device.type == "cuda" and C > MAX_REUSE:  # reuse_rows.cu's (E <= C, above)
        raise RuntimeError(f"reuse_rows: the CUDA kernel holds a pool of at most {MAX_REUSE} "
                           f"slots and a step of at most {MAX_REUSE} entries (G x N, or N with "
                           f"group_select) per sequence and KV head in shared memory, got "
                           f"{_values(C)} slots and {_values(E)} entries")
    _check_last_contiguous("reuse_rows", v_host=v_host, indices=indices)
    for name, pool in (("rows", rows), ("held", held), ("used", used)):
        if not pool.is_contiguous():
            raise RuntimeError(f"reuse_rows: {name} must be contiguous (the pool, updated in "
                               f"place), got strides {_values(pool.stride())} for shape "
                               f"{_values(pool.shape)}")
    _check_no_overlap("reuse_rows", dict(rows=rows, held=held, used=used),
                      dict(indices=indices, v_host=v_host, new_pos=new_pos, step=step))
    return (indices.new_empty((B, Hq, N), dtype=torch.int32),
            indices.new_empty((B, Hkv, 2), dtype=torch.int32))
