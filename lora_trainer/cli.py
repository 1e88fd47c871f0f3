"""`python -m lora_trainer <command>`: tag | prepare | train | demo | serve | ui.

Each command lives in `lora_trainer.commands.<name>` and exposes HELP, add_arguments(parser) and
run(args) -> int. Every refusal (a LoraTrainerError, a bad option, a path the system refuses)
prints one line and exits 2, no traceback (`-v` logs it). A stop signal that ended a run exits
with 128 + its number (see `lora_trainer.signals`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import NoReturn

from .errors import LoraTrainerError

COMMANDS = ("tag", "prepare", "train", "demo", "serve", "ui")

log = logging.getLogger("lora_trainer")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (with where to look) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lora_trainer",
                     description="Tag images, prepare a Kohya dataset and train a LoRA.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"lora_trainer.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


# What the system said → what the user can do about it.
_OS_REMEDIES = {
    errno.EACCES: "check the folder's permissions or choose another one",
    errno.EPERM: "check the folder's permissions or choose another one",
    errno.EROFS: "the disk is read-only; choose a folder on a writable disk",
    errno.ENOSPC: "free some disk space or choose another disk",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "that is a folder; give a file name",
    errno.EEXIST: "choose another name or remove it",
}


def os_error_message(e: OSError) -> str:
    """One sentence of cause and one of remedy for an OSError (disk full, permissions, ...)."""
    where = f" {e.filename}" if e.filename else ""
    cause = e.strerror or os.strerror(e.errno or 0) or type(e).__name__
    remedy = _OS_REMEDIES.get(e.errno or 0, "check the path, its permissions and the free disk space")
    return f"Cannot use{where}: {cause}; {remedy}."


class _UserFormatter(logging.Formatter):
    """What a user reads: notes as plain lines, problems as "warning: ..."; -v shows logger names."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


# Internal detail a user cannot act on (counts of patched modules, graph capture): shown with -v.
_QUIET_LOGGERS = ("lora_trainer.accel",)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _UserFormatter())
    # our notes at INFO; other libraries only from WARNING (httpx's "HTTP Request: ..." lines are not for users)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("lora_trainer").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    from .quiet import quiet_known_warnings

    quiet_known_warnings()  # library noise a user cannot act on, from the first import on


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The process's own command line (`python -m lora_trainer`, the console script), not a caller's list:
    # only then may a command change process-wide state such as hidden_imports.py's.
    args.own_process = argv is None
    _setup_logging(args.verbose)
    from .signals import Aborted, exit_code

    try:
        return int(args._run(args) or 0)
    except LoraTrainerError as e:
        log.debug("error details", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a file operation we did not foresee: still one line
        log.debug("error details", exc_info=True)
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except Aborted as e:
        print(f"aborted by a second {e}; nothing more was saved", file=sys.stderr)
        return exit_code(e.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
