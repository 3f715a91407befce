"""Command line: ``python -m kcache_ops {generate,demo,eval,bench} ...``

Installed with pip, also ``kcache-ops``.

Each subcommand lives in kcache_ops/cli/<name>.py with ``add_arguments(parser)`` and ``run(args)``.
"""
import argparse
import importlib
import shlex
import sys

import torch

COMMANDS = {
    "generate": "generate text with the dense or the kcache attention backend",
    "demo": "dense and kcache side by side on a long prompt (the default model)",
    "eval": "accuracy of kcache against dense: perplexity, needle retrieval, agreement",
    "bench": "decode throughput of kcache against dense at equal device memory",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kcache_ops",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage, or the error for an unknown command
        return 2
    module = importlib.import_module(f"kcache_ops.cli.{argv[0]}")
    cmd_parser = argparse.ArgumentParser(prog=f"python -m kcache_ops {argv[0]}",
                                         description=COMMANDS[argv[0]])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    args.command_line = f"python -m kcache_ops {shlex.join(argv)}"  # what the results record
    try:
        return module.run(args) or 0
    except (ValueError, OSError, MemoryError, torch.OutOfMemoryError) as e:  # bad input found
        # past the flags: a file, a checkpoint, a value the options or the model refuse
        # (CheckpointError, UnsupportedModelError included), caches larger than the memory (the
        # host's, or what the GPU has free)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a command's own refusal of its flags ("error: ..."): a usage error
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
