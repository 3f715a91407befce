"""Tokens cached per sequence, the bookkeeping every cache shares: the lengths on the device, their
maximum mirrored on the host (so no decode step syncs to check the capacity), and the capacity
checks."""
from contextlib import contextmanager

import torch

from ..integers import int_at_least, is_integer_dtype
from ..ops import check_tensors

ATTEND_NONE = object()  # check_layer_inputs' q where a layer's rows are stored, not attended


def check_sizes(owner, batch, capacity):
    """``batch`` and ``capacity`` as ints, each an integer of any type (a NumPy one, a 0-d integer
    tensor) >= 1, else ValueError naming ``owner`` (the cache)."""
    sizes = [int_at_least(n, 1) for n in (batch, capacity)]
    if None in sizes:
        raise ValueError(f"{owner}: batch and capacity must be integers >= 1, got {batch!r} and "
                         f"{capacity!r}")
    return sizes


def check_count(owner, name, value, most):
    """``value`` (a count of ``owner``'s method, a number of ``name``) as an int of any integer
    type in [0, most], else ValueError."""
    n = int_at_least(value, 0)
    if n is None or n > most:
        raise ValueError(f"{owner}: {name} must be an integer in [0, {most}], got {value!r}")
    return n


def index_at(rows, heads, at):
    """rows [B] long (``0..B-1``), heads [H] long (``0..H-1``), at [B] long -> (rows [B, 1], heads,
    at [B, 1]), views: the index of ``buffer[b, h, at[b]]`` for every sequence b and head h of a
    buffer [B, H, S, ...], so that ``buffer[index] = x`` writes x [B, H, ...] (and
    ``buffer[index]`` reads those rows).

    Three index tensors side by side, not ``buffer[rows, :, at]``: under torch's deterministic mode
    CUDA runs index_put_ by sorting, and where the index tensors stand on either side of an
    unindexed dimension (or the buffer is not contiguous) it copies the whole buffer out and back,
    at every call: the whole cache at every decode step, and host V through PCIe."""
    return rows[:, None], heads, at[:, None]


def capturing(t):
    """Whether the current stream of tensor ``t``'s device is capturing a CUDA graph (never on
    the CPU)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class SeqLengths:
    """Lengths of ``batch`` sequences in a cache of ``num_layers`` layers of ``capacity`` tokens
    each (ints, from :func:`check_sizes`) and ``num_kv_heads`` KV heads, on ``device``.

    Attributes
    ----------
    seq_lens : Tensor [B] int32 on ``device``
        Tokens cached per sequence.
    attend_lens : Tensor [B] int32 on ``device``
        ``seq_lens + 1``: the keys a decode step attends over (its new token included).
    positions : Tensor [B] long on ``device``
        ``seq_lens`` as int64: where a decode step stores its token (an index for every layer's
        appends, converted once per step, not once per layer).
    rows : Tensor [B] long on ``device``
        ``0..B-1``, the batch index of a decode step's appends.
    step_index : tuple of Tensor
        :func:`index_at` of rows, the KV heads and positions: ``buffer[step_index] = x
        [B, Hkv, ...]`` stores a decode step's token at ``seq_lens[b]`` of a buffer
        [B, Hkv, S, ...] (views of tensors changed in place: valid for the cache's life).
    longest : int
        ``max(seq_lens)``, kept on the host.
    """

    def __init__(self, owner, batch, capacity, device, num_layers, num_kv_heads):
        self.owner = owner  # the cache's name, for errors
        self.capacity = capacity
        self.num_layers = num_layers
        self._stored = set()  # the layers that have stored the prompt being prefilled
        self._storing = False  # a prompt's store has begun and is not finished
        self._decoded = set()  # the layers that have stored this step's token
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)  # [B]
        self.attend_lens = self.seq_lens + 1  # [B] int32
        self.positions = self.seq_lens.long()  # [B]
        self.rows = torch.arange(batch, device=device)  # [B]
        heads = torch.arange(num_kv_heads, device=device)  # [Hkv]
        self.step_index = index_at(self.rows, heads, self.positions)  # [B, 1], [Hkv], [B, 1]
        self.longest = 0
        # a bound of the rows a prompt or step has stored (of any sequence): past it, a layer's
        # K and V hold zeros where the rows are attended with a mask (dense.store_prompt_rows)
        self.written = 0
        self._graphed = False  # a decode step has been captured into a CUDA graph
        self.prompt_len = 0
        self.prompt_lens = None  # the lens the prompt's first layer was stored with (a copy)
        self._layers_differ = None  # [] bool on the device: a later layer's lens differed

    @contextmanager
    def storing_prompt(self, layer, length, lens):
        """Around the store of ``layer``'s part of a prompt of ``length`` tokens (right-padded;
        its shapes checked by :func:`check_layer_inputs`) and valid rows lens [B]: check it
        fits; once the block ends without an error, the layer counts as stored and its lens are
        kept (the first layer's; whether a later layer's differ, on the device, no sync) for
        :meth:`finish_prefill` to compare. Every layer stores the same ``length``. A layer stored
        a second time starts a new prompt (the one before was given up: a prefill stopped by an
        error, or refused at its finish). From the start of the block until finish_prefill,
        decode is refused: a store that fails part-way has overwritten rows of the prompt before.
        """
        if length > self.capacity:
            raise ValueError(f"{self.owner}: capacity overflow: a prompt of {length} tokens "
                             f"exceeds the cache capacity ({self.capacity} tokens)")
        self._check_lens_tensor(lens)
        if layer in self._stored:
            self._forget_prompt()
        if self._stored and length != self.prompt_len:  # its rows past length would be unstored
            raise ValueError(f"{self.owner}: layer {layer}'s prompt has {length} tokens, but "
                             f"layers {sorted(self._stored)} stored {self.prompt_len}: every "
                             "layer must store the same prompt")
        self._storing = True
        self.prompt_len = length
        self.written = max(self.written, length)
        yield
        self._stored.add(layer)
        if self.prompt_lens is None:  # the prompt's first layer
            self.prompt_lens = lens.clone()
            self._layers_differ = torch.zeros((), dtype=torch.bool, device=lens.device)
        else:
            self._layers_differ |= (lens != self.prompt_lens.to(lens.device)).any().to(
                self._layers_differ.device)

    def finish_prefill(self, lens):
        """``seq_lens = lens`` ([B] int32 on the device, each in [0, the stored prompt's length],
        the lens the prompt was stored with).

        The one place the lengths are checked (one host sync, at prefill): the decode steps trust
        them (KCache passes ``check_values=False`` to the ops). Refused unless every layer has
        stored the prompt (a layer left out would attend over rows it never stored)."""
        self._check_lens_tensor(lens)
        if len(self._stored) != self.num_layers:
            raise ValueError(f"{self.owner}: finish_prefill after storing the prompt of layers "
                             f"{sorted(self._stored)} of {self.num_layers}: every layer must "
                             "store the prompt first")
        differ = (lens != self.prompt_lens.to(lens.device)).any()
        differ |= self._layers_differ.to(lens.device)
        shortest, longest, differ = torch.stack([*torch.aminmax(lens),
                                                 differ.to(lens.dtype)]).tolist()
        if shortest < 0:
            raise ValueError(f"{self.owner}: lens must be >= 0, got {shortest}")
        if longest > self.prompt_len:
            raise ValueError(f"{self.owner}: lens reach {longest} tokens but the prompt had "
                             f"{self.prompt_len}")
        if differ:  # the tails and hot rows kept what the stored lens said was valid
            raise ValueError(f"{self.owner}: lens {lens.tolist()} differ from the lens the prompt "
                             f"was stored with, {self.prompt_lens.tolist()} (at its first layer; "
                             "every layer must be stored with the same lens)")
        self._forget_prompt()  # the next prompt starts afresh
        # every layer cleared the rows past the prompt (store_prompt_rows)
        self.written = self.capacity if self._graphed else self.prompt_len
        self._decoded.clear()  # a step left unfinished before this prompt is gone with it
        self.seq_lens.copy_(lens)
        self._set(longest)

    def _forget_prompt(self):
        """No prompt is being stored: no layer has stored one, no lens to compare."""
        self._stored.clear()
        self._storing = False
        self.prompt_lens = self._layers_differ = None

    def _check_lens_tensor(self, lens):
        """lens: an integer tensor of shape [B]."""
        check_tensors(self.owner, lens=lens)
        if lens.is_meta:  # its values are read (finish_prefill) or copied
            raise ValueError(f"{self.owner}: lens must hold values, got a tensor on the meta "
                             "device")
        if not is_integer_dtype(lens.dtype):
            raise ValueError(f"{self.owner}: lens must be an integer tensor, got {lens.dtype}")
        if lens.shape != self.seq_lens.shape:
            raise ValueError(f"{self.owner}: lens must have shape {list(self.seq_lens.shape)} "
                             f"(one per cached sequence), got {list(lens.shape)}")

    @property
    def graphed(self):
        """Whether a decode step has been captured into a CUDA graph (sticky: its replays advance
        the lengths on the device alone, so the host's ``longest`` no longer bounds them)."""
        return self._graphed

    @contextmanager
    def decode_step(self, layer):
        """Around ``layer``'s decode step: no prompt is half stored, every sequence can take one
        more token; the layer counts as stepped for :meth:`finish_decode` once the block ends
        without an error. (A step refused for its inputs, by :func:`check_layer_inputs`, has
        stored nothing; one that fails inside an op has written the new token's rows, which a
        rerun writes again: either can be run again.)"""
        if self._storing:
            raise ValueError(f"{self.owner}: decode while a prompt is being stored (layers "
                             f"{sorted(self._stored)} of {self.num_layers} stored): store every "
                             "layer's prompt and finish_prefill first")
        if self.longest >= self.capacity:
            raise ValueError(f"{self.owner}: capacity overflow: a sequence of {self.longest} "
                             f"tokens cannot grow past the capacity of {self.capacity} tokens "
                             "(cache full)")
        # a CUDA graph's replays advance the lengths on the device alone, for every prompt after
        # its capture too: from then on any row may have been written
        self._graphed |= capturing(self.seq_lens)
        self.written = self.capacity if self._graphed else max(self.written, self.longest + 1)
        yield
        self._decoded.add(layer)

    def finish_decode(self):
        """After every layer's decode step: ``seq_lens += 1``. Refused before all of them (the
        layers not stepped would attend over a position they never stored)."""
        if len(self._decoded) != self.num_layers:
            raise ValueError(f"{self.owner}: finish_decode after the decode step of layers "
                             f"{sorted(self._decoded)} of {self.num_layers}: every layer must "
                             "decode the step first")
        self._decoded.clear()
        self.seq_lens += 1
        self._set(self.longest + 1)

    def _set(self, longest):
        """The host's maximum, and the device tensors that follow seq_lens, updated in place (one
        address each, so that a CUDA graph of decode steps reads their current values)."""
        self.longest = longest
        torch.add(self.seq_lens, 1, out=self.attend_lens)
        self.positions.copy_(self.seq_lens)


def check_layer_inputs(owner, k_buffers, num_heads, layer, prompt, k, v, q=ATTEND_NONE):
    """Before a cache stores (and attends over) a layer's new rows: ``layer`` indexes k_buffers
    (the cache's K of each layer, [B, Hkv, S, D]); k, v [B, Hkv, T, D] of a prompt (``prompt``)
    or [B, Hkv, D] of a decode step, and q [B, num_heads, (T,) D] (not given where the rows are
    only stored), are tensors that match it exactly (an index put would broadcast a size 1 into
    every sequence or head, and a prompt's attention would group the heads otherwise), in its
    dtype and on its device (checked before anything is stored, so that a refused step leaves
    the cache as it was). Types, shapes, dtypes and devices, on the host: no sync."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(k_buffers):
        raise IndexError(f"{owner}: layer must be an int in [0, {len(k_buffers)}), got {layer!r}")
    check_tensors(owner, k=k, v=v, **({} if q is ATTEND_NONE else dict(q=q)))
    cached = k_buffers[layer]  # [B, Hkv, S, D]
    B, Hkv, _, D = cached.shape
    T = ([k.shape[2]] if k.dim() == 4 else ["T"]) if prompt else []  # a prompt's length
    for name, t, heads in (("k", k, Hkv), ("v", v, Hkv), ("q", q, num_heads)):
        if t is ATTEND_NONE:
            continue
        if list(t.shape) != [B, heads, *T, D]:
            raise ValueError(f"{owner}: {name} must have shape {[B, heads, *T, D]}, got "
                             f"{list(t.shape)}")
        if t.dtype != cached.dtype or t.device != cached.device:
            # autocast casts the projections' outputs, not the cache: a dtype the user never chose
            cast = t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type)
            raise ValueError(f"{owner}: {name} must be {cached.dtype} on {cached.device} (the "
                             f"cache's), got {t.dtype} on {t.device}" + (
                                 " (torch.autocast is on and cast it: run the model and build "
                                 "the cache in the dtype you want instead)" if cast else ""))
