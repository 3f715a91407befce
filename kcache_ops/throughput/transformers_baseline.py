"""The dense baseline checked against a common implementation: Hugging Face transformers'
LlamaForCausalLM (static cache, SDPA) of the same shape, timed at the dense rows' batch and
context."""

import importlib

import torch

from ..devices import median_seconds, sync


def transformers_missing():
    """Why transformers' model code cannot run here: the ImportError's message where it is not
    installed or its version is outside the range kcache_ops is tested with; None where it can."""
    try:  # the integration checks the version at its import
        importlib.import_module("kcache_ops.integrations.transformers_engine")
    except ImportError as e:
        return str(e)
    return None


def hf_model(config, device, dtype, max_len):
    """transformers' LlamaForCausalLM of ``config`` (SDPA attention, random weights) on
    ``device`` in ``dtype`` (see :func:`transformers_missing` for where it can be built). RoPE
    scaling is left at the default (it does not change the timing)."""
    import transformers
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=max_len,
        tie_word_embeddings=config.tie_word_embeddings, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)


@torch.inference_mode()
def time_hf(model, batch, context, steps):
    """Seconds per decode step of the transformers ``model`` with a StaticCache of
    ``context + steps + 2`` tokens at ``batch``.

    A prefill of min(16, ``context``) tokens fills the cache's first rows, and the steps write
    the rows after them (a StaticCache writes at its own count; transformers 5.17 to 5.24 take no
    other position from ``cache_position``): a static cache attends over its whole length, the
    rows not written masked, so each step costs that of a full cache of ``context``."""
    import transformers

    from ..integrations.transformers_engine import cache_arg
    device = model.device
    cache = {cache_arg(model): transformers.StaticCache(config=model.config,
                                                        max_cache_len=context + steps + 2)}
    first = min(16, context)  # a prompt of 16 tokens ran past a cache of 8 + 2 + 2
    ids = torch.randint(0, model.config.vocab_size, (batch, first), device=device)  # [B, first]
    model(input_ids=ids, **cache, cache_position=torch.arange(first, device=device),
          use_cache=True, logits_to_keep=1)
    token = ids[:, :1]  # [B, 1]
    # every step's position made on the device before timing: a tensor made from a host list in
    # the step would wait for the stream each step, losing transformers' launch/compute overlap
    positions = torch.arange(first, first + steps + 2, device=device)  # [steps + 2]

    def step(i):
        model(input_ids=token, **cache, use_cache=True, logits_to_keep=1,
              cache_position=positions[i:i + 1])
    step(0)  # warm-up
    step(1)
    sync(device)
    timed = iter(range(2, steps + 2))
    return median_seconds(device, lambda: step(next(timed)), steps)


def compare_with_hf(config, device, dtype, dense_rows, steps, log=print):
    """Time transformers at the batch and context of each dense row (our model already freed, so
    both fit the same memory) and add ``hf_decode_tok_s`` and ``dense_vs_hf`` to the rows."""
    model = hf_model(config, device, dtype, max(r["context"] for r in dense_rows) + steps + 2)
    for row in dense_rows:
        try:
            hf_s = time_hf(model, row["batch"], row["context"], steps)
        except torch.OutOfMemoryError as e:
            row["hf_error"] = f"out of memory: {e}".splitlines()[0]
            log(f"{row['model']:13s} ctx {row['context']:6d} transformers: {row['hf_error']}")
            continue
        row["hf_decode_tok_s"] = row["batch"] / hf_s
        row["dense_vs_hf"] = hf_s / (row["decode_step_ms"] / 1e3)
        log(f"{row['model']:13s} ctx {row['context']:6d} transformers batch {row['batch']:4d}  "
            f"decode {row['hf_decode_tok_s']:9.1f} tok/s  (dense backend "
            f"{row['dense_vs_hf']:.2f}x of it)")
