"""`python -m lora_trainer ui`: the Train LoRA tab as its own Gradio app (no WebUI needed)."""

from __future__ import annotations

import argparse

from .serve import add_host_arguments, make_host

HELP = "Open the Train LoRA tab in the browser without a WebUI (listens on 127.0.0.1 by default)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_host_arguments(p, port=7861)
    from ..config import PRESETS

    p.add_argument("--preset", default=None, choices=list(PRESETS), metavar="PRESET",
                   help="preset selected when the tab opens: "
                        + ", ".join(f"{key} ({p.label})" for key, p in PRESETS.items()))


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from ..errors import MissingPackageError

        raise MissingPackageError("gradio", "The ui command") from None
    from ..ui import build_tab

    host, jobs = make_host(args)
    settings = {"lora_trainer_default_preset": args.preset} if args.preset else {}
    tab = build_tab(host, settings, jobs=jobs)
    tab.title = "LoRA Trainer"
    from ..ui import compat

    tab.queue(**compat.queue_kwargs(64))  # as A1111 does
    print(f"LoRA Trainer tab on http://{args.host}:{args.port} (LoRAs go to {host.lora_dir()})")
    try:
        tab.launch(server_name=args.host, server_port=args.port, inbrowser=False, show_api=False)
    finally:
        jobs.shutdown()
    return 0
