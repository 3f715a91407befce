"""``python -m kcache_ops generate``: generate text with the dense or the kcache attention backend,
streaming it, then print the timing and the memory the cache holds."""
import sys

import torch

from ..model import CheckpointError, UnsupportedModelError, generate, load_model
from ..model.attention import KCACHE_OPTIONS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dense_layer_list(text):
    """'0,1' -> (0, 1)."""
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_arguments(parser):
    parser.add_argument("--model", help="a .gguf file or a Hugging Face folder "
                                        "(default: the embedded SmolLM2-135M-Instruct)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append",
                     help="prompt text; repeat for a batch of prompts of different lengths")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    parser.add_argument("--backend", choices=("dense", "kcache"), default="dense")
    parser.add_argument("--topn", type=int,
                        help="kcache: V rows read per head and step (default 64)")
    parser.add_argument("--group-select", action="store_const", const=True,
                        help="kcache: one index set per KV head (GQA group)")
    parser.add_argument("--no-renormalize", dest="renormalize", action="store_const", const=False,
                        help="kcache: full-softmax weights, mass outside the top N dropped")
    parser.add_argument("--dense-layers", type=dense_layer_list,
                        help="kcache: comma-separated layers that keep V on the device, e.g. 0,1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="seed of the sampling generator")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template, where it has one")
    parser.add_argument("--device", help="default: cuda where available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default: bfloat16 on CUDA, float32 on the CPU")


def cache_options(args):
    """The kcache options given on the command line; an error if given with --backend dense."""
    given = {k: getattr(args, k) for k in KCACHE_OPTIONS if getattr(args, k) is not None}
    if given and args.backend != "kcache":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise SystemExit(f"error: {flags} apply to --backend kcache only")
    return given


def run(args):
    options = cache_options(args)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            texts = [f.read()]
    else:
        texts = args.prompt
    try:
        model, tokenizer = load_model(args.model, args.device, DTYPES.get(args.dtype))
    except (CheckpointError, UnsupportedModelError) as e:
        raise SystemExit(f"error: {e}") from e
    prompts = [tokenizer.encode_prompt(t, chat=args.chat) for t in texts]
    stream = len(prompts) == 1

    def show(index, text):
        sys.stdout.write(text)
        sys.stdout.flush()
    result = generate(model, prompts, args.max_new_tokens, backend=args.backend,
                      cache_options=options, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, eos_ids=tokenizer.eos_ids, tokenizer=tokenizer,
                      on_text=show if stream else None)
    if stream:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"--- [{i}] {text}")
    mib = 2 ** 20
    print(f"prompt tokens {sum(map(len, prompts))} ({len(prompts)} sequences), prefill "
          f"{result.prefill_s:.2f} s; decode {result.decode_tokens} tokens in "
          f"{result.decode_s:.2f} s = {result.tokens_per_s:.1f} tokens/s", file=sys.stderr)
    print(f"{args.backend} on {model.device} {str(model.dtype).removeprefix('torch.')}; cache "
          f"holds {result.cache.device_bytes() / mib:.1f} MiB device, "
          f"{result.cache.host_bytes() / mib:.1f} MiB host memory", file=sys.stderr)
