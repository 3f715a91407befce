"""The command-line arguments the commands share: the model, device and dtype; the KCache options
(one flag per field of KCacheOptions, generated from the field); integer lists."""
import argparse
import math
import re
from dataclasses import fields, replace

import torch

from ..caches import KCacheOptions
from ..devices import DTYPES, cuda_count


def int_list(text):
    """'0,1' -> (0, 1); '' -> () (none); an empty item ('1,,2', '1,') is an error (a typo)."""
    if not text.strip():
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def layer_list(text):
    """'0,1' -> (0, 1), at least one (the range is the model's to check)."""
    values = int_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, at least "
                                         f"one, got {text!r}")
    return values


def positive_int_list(text):
    """'256,512' -> (256, 512), each >= 1 and given once (a value twice would run twice), at
    least one."""
    values = int_list(text)
    if not values or min(values) < 1 or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, each once, "
                                         f"got {text!r}")
    return values


def _integer_at_least(text, least):
    """``text`` as an integer >= ``least``, else the ArgumentTypeError saying so."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def positive_int(text):
    """An integer >= 1."""
    return _integer_at_least(text, 1)


def nonnegative_int(text):
    """An integer >= 0."""
    return _integer_at_least(text, 0)


def thread_count(text):
    """A torch CPU thread count: an integer in [1, 1024]."""
    value = positive_int(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, 1024], got {text!r}")
    return value


def seed(text):
    """A seed torch.Generator.manual_seed takes: an integer in [-2^63, 2^64)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -(1 << 63) <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2^63, 2^64), got {text!r}")
    return value


def bounded_float(low, high, low_open=False):
    """An argparse type: a finite float in [low, high] ((low, high] with low_open; high None: no
    bound)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = ((value > low if low_open else value >= low) and (high is None or value <= high)
              and math.isfinite(value))
        if not ok:  # NaN and inf too
            bounds = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
            raise argparse.ArgumentTypeError(f"expected a finite number in {bounds}, got "
                                             f"{text!r}")
        return value
    return parse


def device(text):
    """A device the models run on: ``cpu``, or ``cuda`` / ``cuda:N`` where this machine has that
    GPU (checked before any model is loaded) -> torch.device."""
    try:
        value = torch.device(text)
    except RuntimeError:
        value = None
    if value is None or value.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if value.type == "cuda":
        count = cuda_count()
        if (value.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA "
                                             "device(s) torch can use")
    return value


def add_model_arguments(parser):
    """--model, and the device arguments (:func:`add_device_arguments`)."""
    parser.add_argument("--model", help="a .gguf file or a Hugging Face folder "
                                        "(default: the embedded SmolLM2-135M-Instruct)")
    add_device_arguments(parser)


def add_device_arguments(parser, dtype_default=None):
    """--device, --dtype (default ``dtype_default``; None: bfloat16 on CUDA, float32 on the CPU,
    as load_model picks), --threads (the command line's main sets torch's)."""
    parser.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: cuda where "
                                                      "available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=dtype_default,
                        help=f"default: {dtype_default}" if dtype_default else
                        "default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--threads", type=thread_count,
                        help="torch CPU threads (default: torch's, one per core; 1 is faster on "
                             "a CPU that other work shares)")


ENGINES = ("kcache_ops", "transformers")


def add_engine_argument(parser):
    """--engine: the model code that runs on the caches, kcache_ops' own decoder or transformers'
    (through kcache_ops.integrations.transformers)."""
    parser.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                        help="run the model with kcache_ops' own decoder (default) or with "
                             "transformers' model code on the same caches (needs "
                             "pip install 'kcache_ops[transformers]')")


def command_line(args, name):
    """The command the results of subcommand ``name`` record for reproducing them: the one
    ``python -m kcache_ops`` parsed (``args.command_line``, which its ``main`` sets, from the argv
    it was given); where ``run(args)`` was called from Python, which has no command line, that
    call."""
    return getattr(args, "command_line", None) or f"kcache_ops.cli.{name}.run(args), from Python"


def dtype_of(args):
    """The torch dtype of --dtype, or None where it was not given."""
    return DTYPES[args.dtype] if args.dtype else None


def _flag(f):
    """The flag of a KCacheOptions field: its metadata's "flag" where it has one, else --name, or
    --no-name for a bool that defaults to True."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _dest(f):
    """Where argparse keeps a KCacheOptions field's flag: the field's name, or the name of its
    own flag where it has one (so that it does not meet another option of the same name)."""
    return f.metadata["flag"].lstrip("-").replace("-", "_") if "flag" in f.metadata else f.name


def add_kcache_arguments(parser, skip=()):
    """--paper-literal, and one flag per KCacheOptions field (but those in ``skip``; --topn,
    --tail, --reuse, ...: :func:`_flag` names it). Unset flags stay None, so
    :func:`kcache_options` can tell what was given."""
    group = parser.add_argument_group("KCache options")
    group.add_argument("--paper-literal", action="store_true",
                       help="KCache as the paper states it: N=64, a softmax over the top N, no "
                            "tail (the KCache flags below, where given, change it)")
    for f in fields(KCacheOptions):
        if f.name in skip:
            continue
        help_text = f.metadata["help"]
        if isinstance(f.default, bool):
            group.add_argument(_flag(f), dest=_dest(f), action="store_const",
                               const=not f.default, help=help_text)
        elif isinstance(f.default, tuple):
            group.add_argument(_flag(f), dest=_dest(f), type=int_list, help=help_text)
        else:
            group.add_argument(_flag(f), dest=_dest(f), type=type(f.default),
                               choices=f.metadata.get("choices"),
                               help=f"{help_text} (default {f.default})")


def given_kcache_options(args):
    """{field: value} of the KCache flags given on the command line."""
    return {f.name: getattr(args, _dest(f)) for f in fields(KCacheOptions)
            if getattr(args, _dest(f), None) is not None}


def given_kcache_flags(args):
    """The KCache flags given on the command line, as typed: e.g. ["--topn", "--paper-literal"]."""
    flags = [_flag(f) for f in fields(KCacheOptions) if getattr(args, _dest(f), None) is not None]
    return flags + (["--paper-literal"] if getattr(args, "paper_literal", False) else [])


def kcache_options(args):
    """KCacheOptions from the flags given, the rest from the defaults (from
    :meth:`KCacheOptions.paper_literal` with --paper-literal); a bad value exits with the
    error."""
    base = KCacheOptions.paper_literal() if getattr(args, "paper_literal", False) \
        else KCacheOptions()
    try:
        return replace(base, **given_kcache_options(args))
    except ValueError as e:
        message = str(e)
        for f in fields(KCacheOptions):
            if "flag" in f.metadata:  # a field whose flag has another name: the flag too
                message = message.replace(f"KCache: {f.name} ",
                                          f"KCache: {f.name} ({f.metadata['flag']}) ")
            # a combination refused, "renormalize=False ... tail='none'": as the flags say it
            message = re.sub(rf"\b{f.name}=('[^']*'|[^\s,;)]+)",
                             lambda m, f=f: _as_flag(f, m.group(1)), message)
        raise SystemExit(f"error: {message}") from e


def _as_flag(f, value):
    """The flag that sets KCacheOptions field ``f`` to ``value`` (as its repr reads)."""
    if isinstance(f.default, bool):
        return _flag(f) if value == repr(not f.default) else f"no {_flag(f)}"
    unquoted = value.strip("'")  # a string's repr
    return f"{_flag(f)} {unquoted}"
