"""``python -m kcache_ops demo`` (``make demo``): the same long prompt, generated greedily with the
``dense`` backend and with KCache, one after the other; then both texts, where they first differ,
prefill time, decode tokens/s and the memory each cache holds on the device and in host RAM.

The prompt is essay text (kcache_ops.data) with a pass key hidden in it and a question about it,
in the model's chat template where it has one. The defaults run in under a minute on two CPU
cores with the embedded SmolLM2-135M-Instruct (20-40 s measured on two VMs).
"""
from tqdm import tqdm

from ..caches import check_kcache
from ..data import essays_text
from ..eval import needle
from ..generate import generate
from ..model import describe_model, load_model
from .args import (add_kcache_arguments, add_model_arguments, bounded_float, dtype_of,
                   kcache_options, positive_int)
from .progress import PrefillProgress

PASSKEY = "71432"


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--prompt-tokens", type=positive_int, default=2000,
                        help="tokens of essay text in the prompt (default: 2000)")
    parser.add_argument("--depth", type=bounded_float(0.0, 1.0), default=0.5,
                        help="where the pass key sits in the text, 0 (start) to 1 (end); "
                             "default: 0.5")
    parser.add_argument("--new-tokens", type=positive_int, default=48,
                        help="tokens to generate (default: 48)")
    parser.add_argument("--no-chat", dest="chat", action="store_false",
                        help="plain text, not the model's chat template")
    add_kcache_arguments(parser)


def build_prompt(tokenizer, n_tokens, depth, chat):
    """Token ids of about ``n_tokens`` of essay text with the needle at ``depth`` (at a sentence
    start), followed by the question.

    Raises ValueError where the essay text has fewer than ``n_tokens`` tokens."""
    text = essays_text()
    ids = tokenizer.encode(text[:n_tokens * 8], add_special=False)  # ~4 characters a token
    if len(ids) < n_tokens and n_tokens * 8 < len(text):
        ids = tokenizer.encode(text, add_special=False)
    if len(ids) < n_tokens:
        raise ValueError(f"--prompt-tokens must be at most {len(ids)} (the essay text's tokens "
                         f"with this tokenizer), got {n_tokens}")
    return needle.prompt(tokenizer, ids[:n_tokens], depth, PASSKEY, chat)


def generate_with_progress(model, tokenizer, prompt, backend, options, new_tokens):
    """Greedy generation of ``new_tokens`` with ``backend`` -> Generation, with a progress bar."""
    with tqdm(total=new_tokens, desc=f"{backend:6s} prefill {len(prompt)} tokens + decode",
              unit="tok", leave=False) as bar, PrefillProgress(model, f"{backend:6s} prefill"):
        result = generate(model, [prompt], new_tokens, backend=backend, options=options,
                          eos_ids=tokenizer.eos_ids, tokenizer=tokenizer,
                          on_token=lambda *_: bar.update(1))
    return result


def first_difference(a, b):
    """Index of the first token where lists a and b differ, or None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(args):
    options = kcache_options(args)
    model, tokenizer = load_model(args.model, args.device, dtype_of(args))
    check_kcache(model.config, model.device, model.dtype, options)  # before the dense run
    c = model.config
    prompt = build_prompt(tokenizer, args.prompt_tokens, args.depth, args.chat)
    # what only the kcache run's capacity decides (reuse's slots for a step's rows), before the
    # dense run, not after it
    check_kcache(c, model.device, model.dtype, options, len(prompt) + args.new_tokens)
    print(f"model: {describe_model(args.model)}")
    print(f"       {c.num_layers} layers, {c.num_heads} query / {c.num_kv_heads} KV heads, "
          f"head dim {c.head_dim}, on {model.device} in {str(model.dtype).removeprefix('torch.')}")
    print(f"prompt: {len(prompt)} tokens, pass key {PASSKEY} at {args.depth:.0%} depth; "
          f"{args.new_tokens} new tokens, greedy")
    print(f"kcache: {options.summary()}")
    runs = {backend: generate_with_progress(model, tokenizer, prompt, backend, backend_options,
                                            args.new_tokens)
            for backend, backend_options in (("dense", None), ("kcache", options))}
    for backend, result in runs.items():
        print(f"\n--- {backend} ---\n{result.texts[0]}")
    print(f"\n{'backend':8s} {'prefill s':>10s} {'decode tok/s':>13s} {'cache device MiB':>17s} "
          f"{'cache host MiB':>15s}  pass key")
    for backend, r in runs.items():
        rate = "-" if r.decode_tokens == 0 else f"{r.tokens_per_s:.2f}"  # one token: no step
        print(f"{backend:8s} {r.prefill_s:10.2f} {rate:>13s} "
              f"{r.cache.device_bytes() / 2**20:17.1f} {r.cache.host_bytes() / 2**20:15.1f}  "
              f"{'found' if PASSKEY in r.texts[0] else 'missed'}")
    dense, kcache = runs["dense"].tokens[0], runs["kcache"].tokens[0]
    diff = first_difference(dense, kcache)
    print("outputs identical" if diff is None else
          f"outputs first differ at new token {diff} (of {len(dense)} dense, {len(kcache)} kcache)")
