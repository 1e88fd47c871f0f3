"""`python -m lora_trainer ui`: the Train LoRA tab as its own Gradio app (no WebUI needed)."""

from __future__ import annotations

import argparse
import threading

from .serve import _listen_address, add_host_arguments, auth_credentials, make_host

HELP = "Open the Train LoRA tab in the browser without a WebUI (listens on 127.0.0.1 by default)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_host_arguments(p, port=7861)
    from ..config import PRESETS

    p.add_argument("--preset", default=None, choices=list(PRESETS), metavar="PRESET",
                   help="preset selected when the tab opens: "
                        + ", ".join(f"{key} ({p.label})" for key, p in PRESETS.items()))


def run(args: argparse.Namespace) -> int:
    creds = auth_credentials(args)  # refuses --listen without --api-auth / --insecure-no-auth
    address = _listen_address(args)
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
    print(f"LoRA Trainer tab on http://{address}:{args.port} (LoRAs go to {host.lora_dir()})", flush=True)
    from ..signals import GracefulStop, safe_streams, signal_name

    drained = threading.Event()
    stopped_jobs: list[str] = []

    def drain() -> None:  # off the signal handler: the running job may take a while to save
        jobs.shutdown(timeout=None)
        drained.set()

    def on_stop(signum: int) -> None:
        current = jobs.current()
        if current is not None and current.state == "running":
            stopped_jobs.append(current.id)
        threading.Thread(target=drain, name="lora-trainer-drain", daemon=True).start()

    with safe_streams(), GracefulStop(on_stop, message=lambda s: f"{signal_name(s)} received: stopping the "
                                      "running job after its step (saved, resumable); again to abort.") as stopper:
        try:
            tab.launch(server_name=address, server_port=args.port, inbrowser=False, show_api=False,
                       auth=list(creds.items()) or None, prevent_thread_lock=True)
            while not drained.wait(0.5):  # the main thread must stay free to take the signals
                pass
        finally:
            jobs.shutdown(timeout=0)
            # Gradio 3.41's close() can wait forever on a page's websocket after the page is gone; the jobs
            # are saved by now, so give it a few seconds and let the process end either way.
            closer = threading.Thread(target=tab.close, name="lora-trainer-close", daemon=True)
            closer.start()
            closer.join(10)
    return (stopper.exit_code or 1) if stopped_jobs else 0
