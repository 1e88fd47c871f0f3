"""`python -m lora_trainer <command>`: tag | prepare | train | demo.

Each command lives in `lora_trainer.commands.<name>` and exposes HELP, add_arguments(parser) and
run(args) -> int. Users' mistakes (LoraTrainerError) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import LoraTrainerError

COMMANDS = ("tag", "prepare", "train", "demo", "serve", "ui")

log = logging.getLogger("lora_trainer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer",
                                     description="Tag images, prepare a Kohya dataset and train a LoRA.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"lora_trainer.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except LoraTrainerError as e:
        log.debug("error details", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
