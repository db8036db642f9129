"""The ``dmd2`` command. Each subcommand lives in ``trainer/commands/<name>.py`` with ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their subcommand runs, so ``dmd2 --help`` is instant."""
from __future__ import annotations

import argparse
import importlib
import sys

from trainer.errors import DMD2Error

COMMANDS = {
    "inspect": "Show what the SDXL loader finds in a checkpoint",
    "prepare": "Encode prompts, images and teacher samples once into the training cache",
    "train": "Distill a teacher into a few-step LoRA with DMD2",
    "generate": "Sample the student (or the teacher) to a PNG",
    "export": "Re-export a trained LoRA, or merge it into a single-file checkpoint",
    "demo": "Distill the bundled toy teacher and write outputs/demo/",
}


def _command_module(name: str):
    return importlib.import_module(f"trainer.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dmd2", description="DMD2 few-step distillation for SDXL checkpoints")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Parse the command name first, then let only that module build its parser (lazy heavy imports).
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv[:1])
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = _command_module(name)
    cmd_parser = argparse.ArgumentParser(prog=f"dmd2 {name}", description=COMMANDS[name])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except DMD2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
