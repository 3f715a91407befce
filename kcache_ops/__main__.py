"""Command line: ``python -m kcache_ops {generate,demo,eval,bench} ...``

Installed with pip, also ``kcache-ops`` (:func:`cli`).

Each subcommand lives in kcache_ops/cli/<name>.py with ``add_arguments(parser)`` and ``run(args)``.
"""
import argparse
import importlib
import os
import shlex
import sys
import warnings

import torch

COMMANDS = {
    "generate": "generate text with the dense or the kcache attention backend",
    "demo": "dense and kcache side by side on a long prompt (the default model)",
    "eval": "accuracy of kcache against dense: perplexity, needle retrieval, agreement",
    "bench": "decode throughput of kcache against dense at equal device memory",
}


BROKEN_PIPE = 141  # main's exit status where stdout's reader left: 128 + SIGPIPE, as a shell says


def main(argv=None, prog="python -m kcache_ops"):
    """Run the command of ``argv`` (default sys.argv[1:]) -> its exit status; ``prog``: how the
    user called it, for usage and help."""
    parser = argparse.ArgumentParser(prog=prog, description="KCache against dense attention: "
                                                            "generate, demo, eval and bench")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage, or the error for an unknown command
        return 2
    module = importlib.import_module(f"kcache_ops.cli.{argv[0]}")
    # no abbreviations: `demo --prompt x` would be --prompt-tokens x, and its error name a flag
    # the user never typed
    cmd_parser = argparse.ArgumentParser(prog=f"{prog} {argv[0]}",
                                         description=COMMANDS[argv[0]], allow_abbrev=False)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    args.command_line = f"python -m kcache_ops {shlex.join(argv)}"  # what the results record
    if args.threads:  # every command's (cli/args.py's add_device_arguments)
        torch.set_num_threads(args.threads)
    format_warning = warnings.formatwarning  # a warning as one line: no source path nor code
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        code = module.run(args) or 0
        sys.stdout.flush()  # here, where a reader that left is caught, not at the exit
        return code
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`... | head`): stop quietly
        return BROKEN_PIPE
    except (ValueError, OSError, MemoryError, torch.OutOfMemoryError, ImportError) as e:
        # bad input found past the flags: a file, a checkpoint, a value the options or the model
        # refuse (CheckpointError, UnsupportedModelError included), caches larger than the memory
        # (the host's, or what the GPU has free); an optional package a file needs (gguf)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a command's own refusal of its flags ("error: ..."): a usage error
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = format_warning


def cli(argv=None):
    """:func:`main` as a process runs it (``python -m kcache_ops``, the ``kcache-ops`` script),
    which exits with the status it returns: where stdout's reader left, stdout goes to devnull
    first, as Python's docs advise, so that the flush at exit cannot fail again."""
    script = os.path.basename(sys.argv[0])
    code = main(argv, script if script == "kcache-ops" else "python -m kcache_ops")
    if code == BROKEN_PIPE:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":
    sys.exit(cli())
