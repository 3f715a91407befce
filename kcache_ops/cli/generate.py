"""``python -m kcache_ops generate``: generate text with the dense or the kcache attention backend,
streaming it, then print the timing and the memory the cache holds."""
import argparse
import math
import sys
import warnings

import torch

from ..caches import BACKENDS, check_kcache
from ..generate import generate
from ..model import load_model
from ..ops import as_float32
from .args import (add_kcache_arguments, add_model_arguments, bounded_float, dtype_of,
                   given_kcache_flags, kcache_options, positive_int, seed)
from .progress import PrefillProgress


def temperature(text):
    """--temperature: a number >= 0 that is finite as a float32, as sample() takes it (1e39 is
    refused before the model loads, not after)."""
    value = bounded_float(0.0, None)(text)
    if as_float32(value) == math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 that is finite as a float32 (at "
                                         f"most {torch.finfo(torch.float32).max:.8g}), got "
                                         f"{text!r}")
    return value


def add_arguments(parser):
    add_model_arguments(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append",
                     help="prompt text; repeat for a batch of prompts of different lengths")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    parser.add_argument("--backend", choices=BACKENDS, default="dense",
                        help="attention backend (default dense)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128,
                        help="new tokens per prompt at most (default 128)")
    parser.add_argument("--temperature", type=temperature, default=0.0,
                        help="0 (default): greedy; above 0: sample (then --top-p, --top-k)")
    parser.add_argument("--top-p", type=bounded_float(0.0, 1.0, low_open=True),
                        help="nucleus sampling: draw from the most likely tokens whose "
                             "probability reaches this (default 1: all); not --attn-top-p, "
                             "KCache's budget")
    parser.add_argument("--top-k", type=positive_int,
                        help="sample among the k most likely tokens (default: all)")
    parser.add_argument("--seed", type=seed, help="seed of the sampling generator")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template, where it has one")
    add_kcache_arguments(parser)


def cache_options(args):
    """The KCacheOptions of --backend kcache (None for dense); an error if KCache flags are
    given with --backend dense."""
    flags = given_kcache_flags(args)
    if args.backend != "kcache":
        if flags:
            raise SystemExit(f"error: {', '.join(flags)} "
                             f"{'applies' if len(flags) == 1 else 'apply'} to --backend kcache "
                             "only")
        return None
    return kcache_options(args)


def read_prompts(args):
    """The prompt texts of --prompt or --prompt-file (UTF-8, a BOM dropped), checked before the
    model loads: ValueError naming the flag for an empty prompt, text not UTF-8, or a file that
    cannot be read."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8-sig") as f:
                texts = [f.read()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({e})") from None
        except OSError as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
        if not texts[0]:
            raise ValueError(f"--prompt-file {args.prompt_file} is empty")
        return texts
    for i, text in enumerate(args.prompt, 1):  # an argument not UTF-8 arrives with surrogates
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"--prompt {text!r} is not UTF-8 text ({e})") from None
        if not text:
            raise ValueError(f"--prompt {i} is empty" if len(args.prompt) > 1
                             else "--prompt is empty")
    return args.prompt


def run(args):
    options = cache_options(args)
    sampling = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k),
                                         ("--seed", args.seed)) if value is not None]
    if sampling and args.temperature == 0:
        raise SystemExit(f"error: {', '.join(sampling)} "
                         f"{'applies' if len(sampling) == 1 else 'apply'} to sampling; give "
                         f"--temperature > 0 (0, the default, is greedy)")
    texts = read_prompts(args)
    model, tokenizer = load_model(args.model, args.device, dtype_of(args))
    if args.chat and tokenizer.chat_template is None:
        warnings.warn("--chat: the model has no chat template; the prompt is used as plain text")
    prompts = [tokenizer.encode_prompt(t, chat=args.chat) for t in texts]
    empty = [i + 1 for i, p in enumerate(prompts) if not p]
    if empty:  # generate would say "token counts [0]"
        what = (f"--prompt-file {args.prompt_file}" if args.prompt_file else
                "--prompt" if len(prompts) == 1 else f"--prompt {empty[0]}")
        raise ValueError(f"{what} encodes to no token (none of its characters is in the "
                         f"tokenizer's vocabulary)")
    if options is not None:  # what the KCache would refuse, before the prefill is announced
        check_kcache(model.config, model.device, model.dtype, options,
                     max(map(len, prompts)) + args.max_new_tokens)
    stream = len(prompts) == 1

    def show(index, text):
        sys.stdout.write(text)
        sys.stdout.flush()
    counted = (f"{sum(map(len, prompts))} prompt tokens ({len(prompts)} "
               f"sequence{'s' if len(prompts) > 1 else ''})")
    print(f"prefill: {counted} on {model.device}", file=sys.stderr, flush=True)
    with PrefillProgress(model):  # minutes for a long prompt on a CPU
        result = generate(model, prompts, args.max_new_tokens, backend=args.backend,
                          options=options, temperature=args.temperature,
                          top_p=1.0 if args.top_p is None else args.top_p,
                          top_k=args.top_k,
                          seed=args.seed, eos_ids=tokenizer.eos_ids, tokenizer=tokenizer,
                          on_text=show if stream else None,
                          reuse_stats=options is not None and options.reuse > 0)  # shown below
    if stream:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"--- [{i}] {text}")
    mib = 2 ** 20
    ended = sum(len(t) < args.max_new_tokens for t in result.tokens)  # EOS is not in tokens
    decoded = (f"decode {result.decode_tokens} more in {result.decode_s:.2f} s = "
               f"{result.tokens_per_s:.1f} tokens/s" if result.decode_tokens else
               "no decode step")
    print(f"{counted}, prefill {result.prefill_s:.2f} s (the first new token); {decoded}"
          + (f"; {ended} of {len(prompts)} ended at an end-of-sequence token" if ended else ""),
          file=sys.stderr)
    print(f"{args.backend} on {model.device} {str(model.dtype).removeprefix('torch.')}; cache "
          f"holds {result.cache.device_bytes() / mib:.1f} MiB device, "
          f"{result.cache.host_bytes() / mib:.1f} MiB host memory", file=sys.stderr)
    if options is not None and options.reuse:
        rate = result.cache.reuse_hit_rate()[list(result.cache.reuse)].nanmean()  # KCache layers
        if result.decode_tokens == 0:
            print("reuse: no decode step ran", file=sys.stderr)
        elif rate.isnan():
            print("reuse: no decode step read a V row from host RAM", file=sys.stderr)
        else:
            slots = next(iter(result.cache.reuse.values())).held.shape[-1]  # [B, Hkv, C]
            capped = (f"; --reuse {options.reuse} capped: more slots than the "
                      f"{result.cache.capacity}-token cache would stay empty"
                      if slots < options.reuse else "")
            print(f"reuse: {100 * rate:.0f}% of the V rows a step read came from the device pool "
                  f"({slots} rows per KV head{capped}), "
                  f"{result.cache.host_bytes_saved_per_step() / 1024:.1f} KiB of host reads "
                  f"saved per step", file=sys.stderr)
