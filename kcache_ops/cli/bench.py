"""``python -m kcache_ops bench``: decode throughput of the reference decoder with the ``dense``
backend against KCache at one device-memory budget, random bf16 weights (their values do not change
the timing), Llama-3-8B and SmolLM2-135M shapes, contexts 8K / 32K / 64K.

For each (model, context) and backend: the largest batch whose cache fits the budget (from the
cache's own bytes per token: dense holds K and V on the device, KCache holds K plus the V of its
dense layers), the prefill timed at batch 1 and the decode timed at that batch, device and host
memory, and the bytes crossing PCIe per decode step. In the same run, Hugging Face transformers'
LlamaForCausalLM (static cache, SDPA) decodes the dense shape, so the dense baseline is checked
against a common implementation. One line per configuration, then bench/results/bench.json,
bench_throughput.png and REPORT.md.

``--device cpu --small`` runs tiny shapes and short contexts: a smoke test of the machinery.
"""
import json
import os
import shlex
import sys
import time

import torch

from ..eval import report
from ..eval.suite import machine
from ..model import Llama, LlamaConfig
from .generate import DTYPES, dense_layer_list

GiB = 2 ** 30
SHAPES = {
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             rope_theta=500000.0, max_position_embeddings=131072,
                             rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True),
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=4096),
}


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_arguments(parser):
    parser.add_argument("--device", help="default: cuda where available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--models", default="llama3-8b,smollm2-135m",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--contexts", type=_ints, default=(8192, 32768, 65536),
                        help="prompt lengths in tokens (default 8192,32768,65536)")
    parser.add_argument("--budget", type=float,
                        help="GB of device memory for the cache (default: what is free after the "
                             "weights, less --reserve)")
    parser.add_argument("--reserve", type=float, default=6.0,
                        help="GB kept free for activations when --budget is not given (default 6)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps (default 32)")
    parser.add_argument("--topn", type=int, default=64)
    parser.add_argument("--group-select", action="store_true")
    parser.add_argument("--dense-layers", type=dense_layer_list, default=(),
                        help="KCache layers that keep V on the device, e.g. 0,1")
    parser.add_argument("--no-hf", dest="hf", action="store_false",
                        help="skip the Hugging Face transformers comparison")
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes, contexts 256/512/1024, a 4 MB budget: tests the "
                             "machinery on a CPU")
    parser.add_argument("--out", default=report.RESULTS)


def random_model(config, device, dtype):
    """Llama of ``config`` on ``device`` in ``dtype`` with random weights (normal, std 0.02;
    norms 1), built without a float32 copy."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Llama(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_per_token(model, backend, options):
    """(device bytes, host bytes) one token of one sequence costs in a cache of ``backend``."""
    cache = model.new_cache(backend, 1, 1, **options)
    return cache.device_bytes(), cache.host_bytes()


def pcie_bytes_per_step(config, batch, options, elt):
    """Bytes read from / written to host RAM per KCache decode step: the top-N V rows of each
    query head (of each KV head with group_select) and the new token's V, per KCache layer."""
    layers = config.num_layers - len(options.get("dense_layers", ()))
    heads = config.num_kv_heads if options.get("group_select") else config.num_heads
    rows = heads * options["topn"] + config.num_kv_heads  # read rows + appended rows
    return layers * batch * rows * config.head_dim * elt


@torch.inference_mode()
def time_prefill(model, backend, options, context):
    """Seconds of one prefill of ``context`` random tokens at batch 1 (after a 64-token
    warm-up prefill)."""
    for length in (min(64, context), context):
        cache = model.new_cache(backend, 1, length + 1, **options)
        tokens = torch.randint(0, model.config.vocab_size, (1, length),
                               device=model.device)  # [1, T]
        lens = torch.full((1,), length, dtype=torch.int32, device=model.device)  # [1]
        sync(model.device)
        start = time.perf_counter()
        model.prefill(tokens, lens, cache)
        sync(model.device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model, backend, options, batch, context, steps):
    """Fill a cache of ``batch`` sequences with ``context`` random K/V rows, then time ``steps``
    decode steps -> (seconds per step, cache device bytes, cache host bytes, peak device bytes)."""
    c, device = model.config, model.device
    cache = model.new_cache(backend, batch, context + steps + 2, **options)
    kv = torch.randn(batch, c.num_kv_heads, context, c.head_dim, device=device,
                     dtype=model.dtype)  # [B, Hkv, T, D]; the same rows serve every layer
    for layer in range(c.num_layers):
        cache.store_prompt(layer, kv, kv)
    del kv
    cache.finish_prefill(torch.full((batch,), context, dtype=torch.int32, device=device))
    token = torch.randint(0, c.vocab_size, (batch,), device=device)  # [B]
    model.decode(token, cache)  # warm-up
    model.decode(token, cache)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        model.decode(token, cache)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return seconds, cache.device_bytes(), cache.host_bytes(), peak


def hf_model(config, device, dtype, max_len):
    """transformers' LlamaForCausalLM of ``config`` (SDPA attention, random weights) on
    ``device`` in ``dtype``, or None where transformers is not installed. RoPE scaling is left at
    the default (it does not change the timing)."""
    try:
        import transformers
    except ImportError:
        return None
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

    A 16-token prefill fills the cache's first rows; the timed steps then write at positions
    ``context`` on: a static cache attends over its whole length, so the cost is that of a full
    cache."""
    import transformers
    device = model.device
    cache = transformers.StaticCache(config=model.config, max_cache_len=context + steps + 2)
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)  # [B, 16]
    model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(16, device=device),
          use_cache=True, logits_to_keep=1)
    token = ids[:, :1]  # [B, 1]

    def step(pos):
        model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1,
              cache_position=torch.tensor([pos], device=device))
    step(context)  # warm-up
    step(context + 1)
    sync(device)
    start = time.perf_counter()
    for t in range(steps):
        step(context + 2 + t)
    sync(device)
    return (time.perf_counter() - start) / steps


def compare_with_hf(config, device, dtype, dense_rows, steps):
    """Time transformers at the batch and context of each dense row (our model already freed, so
    both fit the same memory) and add ``hf_decode_tok_s`` and ``dense_vs_hf`` to the rows."""
    model = hf_model(config, device, dtype, max(r["context"] for r in dense_rows) + steps + 2)
    if model is None:
        return
    for row in dense_rows:
        try:
            hf_s = time_hf(model, row["batch"], row["context"], steps)
        except torch.OutOfMemoryError as e:
            row["hf_error"] = f"out of memory: {e}".splitlines()[0]
            print(f"{row['model']:13s} ctx {row['context']:6d} transformers: {row['hf_error']}")
            continue
        row["hf_decode_tok_s"] = row["batch"] / hf_s
        row["dense_vs_hf"] = hf_s / (row["decode_step_ms"] / 1e3)
        print(f"{row['model']:13s} ctx {row['context']:6d} transformers batch {row['batch']:4d}  "
              f"decode {row['hf_decode_tok_s']:9.1f} tok/s  (dense backend "
              f"{row['dense_vs_hf']:.2f}x of it)", flush=True)


def host_available():
    """Bytes of host RAM available (MemAvailable), or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return kib * 1024
    except (OSError, StopIteration):
        return None


def budget_bytes(args, device):
    """The device-memory budget for the cache, in bytes."""
    if args.budget is not None:
        return int(args.budget * 1e9)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0] - args.reserve * 1e9)
    raise SystemExit("error: give --budget (GB) on the CPU, or --small")


def plot(rows, path):
    """Decode tokens/s against context, one curve per (model, backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["model"], r["backend"]) for r in rows}):
        pts = sorted((r["context"], r["decode_tok_s"]) for r in rows
                     if (r["model"], r["backend"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{key[0]} {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (whole batch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Decode throughput at one device-memory budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    models, contexts = args.models.split(","), args.contexts
    if args.small:
        models, contexts = ["tiny"], (256, 512, 1024)
        args.budget = args.budget or 0.004
        args.steps = min(args.steps, 8)
    kc_options = dict(topn=args.topn, group_select=args.group_select,
                      dense_layers=args.dense_layers)
    info = machine(device)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    command = "python -m kcache_ops bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                                        else sys.argv[1:])
    rows = []
    host_budget = host_available()
    host_budget = None if host_budget is None else int(0.8 * host_budget)
    for name in models:
        config = SHAPES[name]
        model = random_model(config, device, dtype)
        budget = budget_bytes(args, device)
        print(f"# {name}: budget {budget / GiB:.3f} GiB for the cache", flush=True)
        dense_rows = []
        for context in contexts:
            dense_row = None
            for backend, options in (("dense", {}), ("kcache", kc_options)):
                per_token, host_per_token = bytes_per_token(model, backend, options)
                capacity = context + args.steps + 2
                batch = min(args.max_batch, budget // (per_token * capacity))
                if host_per_token and host_budget is not None:
                    batch = min(batch, host_budget // (host_per_token * capacity))
                if batch < 1:
                    print(f"{name:13s} ctx {context:6d} {backend:6s}: one sequence does not fit "
                          f"the budget", flush=True)
                    continue
                prefill_s = time_prefill(model, backend, options, context)
                step_s, dev, host, peak = time_decode(model, backend, options, batch, context,
                                                      args.steps)
                row = {"model": name, "context": context, "backend": backend, "batch": batch,
                       "options": {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in options.items()},
                       "budget_bytes": budget, "cache_device_bytes": dev, "host_bytes": host,
                       "peak_device_bytes": peak, "prefill_tok_s": context / prefill_s,
                       "decode_step_ms": 1e3 * step_s, "decode_tok_s": batch / step_s,
                       "pcie_bytes_per_step": (pcie_bytes_per_step(config, batch, options,
                                                                   model.dtype.itemsize)
                                               if backend == "kcache" else 0)}
                if backend == "dense":
                    dense_row = row
                    dense_rows.append(row)
                elif dense_row is not None:
                    row["vs_dense"] = row["decode_tok_s"] / dense_row["decode_tok_s"]
                rows.append(row)
                print(f"{name:13s} ctx {context:6d} {backend:6s} batch {batch:4d}  prefill "
                      f"{row['prefill_tok_s']:9.0f} tok/s  decode {row['decode_tok_s']:9.1f} tok/s "
                      f"({row['decode_step_ms']:.1f} ms/step)  cache dev {dev / GiB:.3f} GiB  "
                      f"host {host / GiB:.3f} GiB  PCIe {row['pcie_bytes_per_step'] / 2**20:.2f} "
                      f"MiB/step" + (f"  vs dense {row['vs_dense']:.2f}x" if "vs_dense" in row
                                     else ""), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.hf and dense_rows:
            compare_with_hf(config, device, dtype, dense_rows, args.steps)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, report.BENCH_JSON), "w") as f:
        json.dump({"machine": info, "command": command, "small": args.small, "rows": rows}, f,
                  indent=1)
    plot(rows, os.path.join(args.out, "bench_throughput.png"))
    report.write(args.out)
    print(f"# wrote {os.path.join(args.out, report.BENCH_JSON)}, bench_throughput.png, REPORT.md")
