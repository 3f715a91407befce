"""``python -m kcache_ops demo`` (``make demo``): the same long prompt, generated greedily with the
``dense`` backend and with KCache, one after the other; then both texts, where they first differ,
prefill time, decode tokens/s and the memory each cache holds on the device and in host RAM.

The prompt is essay text (kcache_ops.data) with a pass key hidden in it and a question about it,
in the model's chat template where it has one. The defaults run in about a minute or two on two
CPU cores with the embedded SmolLM2-135M-Instruct.
"""
from tqdm import tqdm

from ..data import essays_text
from ..model import generate, load_model
from .generate import DTYPES, dense_layer_list

PASSKEY = "71432"
NEEDLE = f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. "
QUESTION = "What is the pass key? Answer with the number only."


def add_arguments(parser):
    parser.add_argument("--model", help="a .gguf file or a Hugging Face folder "
                                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt-tokens", type=int, default=2000,
                        help="tokens of essay text in the prompt (default: 2000)")
    parser.add_argument("--depth", type=float, default=0.5,
                        help="where the pass key sits in the text, 0 (start) to 1 (end); "
                             "default: 0.5")
    parser.add_argument("--new-tokens", type=int, default=48,
                        help="tokens to generate (default: 48)")
    parser.add_argument("--topn", type=int, default=64, help="KCache: V rows read per head (64)")
    parser.add_argument("--group-select", action="store_true",
                        help="KCache: one index set per KV head (GQA group)")
    parser.add_argument("--no-renormalize", dest="renormalize", action="store_false",
                        help="KCache: full-softmax weights, the mass outside the top N dropped")
    parser.add_argument("--dense-layers", type=dense_layer_list, default=(),
                        help="KCache: comma-separated layers that keep V on the device")
    parser.add_argument("--device", help="default: cuda where available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-chat", dest="chat", action="store_false",
                        help="plain text, not the model's chat template")


def build_prompt(tokenizer, n_tokens, depth, chat):
    """Token ids of about ``n_tokens`` of essay text with the needle at ``depth`` (at a sentence
    start), followed by the question."""
    text = essays_text()
    ids = tokenizer.encode(text[:n_tokens * 8], add_special=False)[:n_tokens]
    haystack = tokenizer.decode(ids)
    cut = haystack.rfind(". ", 0, int(len(haystack) * depth))  # the sentence end before depth
    cut = cut + 2 if cut >= 0 else 0
    document = haystack[:cut] + NEEDLE + haystack[cut:]
    return tokenizer.encode_prompt(f"{document}\n\n{QUESTION}", chat=chat)


def generate_with_progress(model, tokenizer, prompt, backend, options, new_tokens):
    """Greedy generation of ``new_tokens`` with ``backend`` -> Generation, with a progress bar."""
    with tqdm(total=new_tokens, desc=f"{backend:6s} prefill {len(prompt)} tokens + decode",
              unit="tok", leave=False) as bar:
        result = generate(model, [prompt], new_tokens, backend=backend, cache_options=options,
                          eos_ids=tokenizer.eos_ids, tokenizer=tokenizer,
                          on_text=lambda _, piece: bar.update(1))
    return result


def first_difference(a, b):
    """Index of the first token where lists a and b differ, or None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(args):
    dtype = DTYPES[args.dtype] if args.dtype else None
    model, tokenizer = load_model(args.model, args.device, dtype)
    c = model.config
    prompt = build_prompt(tokenizer, args.prompt_tokens, args.depth, args.chat)
    kcache_options = {"topn": args.topn, "group_select": args.group_select,
                      "renormalize": args.renormalize, "dense_layers": args.dense_layers}
    print(f"model: {c.num_layers} layers, {c.num_heads} query / {c.num_kv_heads} KV heads, "
          f"head dim {c.head_dim}, on {model.device} in {str(model.dtype).removeprefix('torch.')}")
    print(f"prompt: {len(prompt)} tokens, pass key {PASSKEY} at {args.depth:.0%} depth; "
          f"{args.new_tokens} new tokens, greedy")
    print("kcache: " + ", ".join(f"{k}={v}" for k, v in kcache_options.items()))
    runs = {backend: generate_with_progress(model, tokenizer, prompt, backend, options,
                                            args.new_tokens)
            for backend, options in (("dense", {}), ("kcache", kcache_options))}
    for backend, result in runs.items():
        print(f"\n--- {backend} ---\n{result.texts[0]}")
    print(f"\n{'backend':8s} {'prefill s':>10s} {'decode tok/s':>13s} {'cache device MiB':>17s} "
          f"{'cache host MiB':>15s}  pass key")
    for backend, r in runs.items():
        print(f"{backend:8s} {r.prefill_s:10.2f} {r.tokens_per_s:13.2f} "
              f"{r.cache.device_bytes() / 2**20:17.1f} {r.cache.host_bytes() / 2**20:15.1f}  "
              f"{'found' if PASSKEY in r.texts[0] else 'missed'}")
    dense, kcache = runs["dense"].tokens[0], runs["kcache"].tokens[0]
    diff = first_difference(dense, kcache)
    print("outputs identical" if diff is None else
          f"outputs first differ at new token {diff} (of {len(dense)} dense, {len(kcache)} kcache)")
