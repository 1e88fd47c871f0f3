"""`python -m lora_trainer serve`: the HTTP API (/lora-trainer/v1) on its own, with uvicorn."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "Run the HTTP API (/lora-trainer/v1) without a WebUI (listens on 127.0.0.1 by default)."

log = logging.getLogger(__name__)


def add_host_arguments(p: argparse.ArgumentParser, *, port: int) -> None:
    """Options shared by `serve` and `ui`: where LoRAs go and which model trains."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; other addresses expose your files)")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    p.add_argument("--lora-dir", default="models/Lora", help="where finished LoRAs go (default models/Lora)")
    p.add_argument("--work-dir", default=None,
                   help="run folders, uploads and prepared datasets (default: beside the Lora folder)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="checkpoint (.safetensors/.ckpt) or diffusers folder to train on")
    group.add_argument("--tiny", choices=("sd1", "sd2", "sdxl"), default=None,
                       help="train a tiny random model (for trying the tab; the LoRA is useless)")
    p.add_argument("--allow", action="append", default=None, metavar="DIR",
                   help="only allow typed paths inside DIR (repeatable; default: any path when on 127.0.0.1, "
                        "the work and Lora folders' parent otherwise)")


def make_host(args: argparse.Namespace):
    """(StandaloneHost, JobManager) for the options above."""
    from ..errors import ConfigError
    from ..host import StandaloneHost
    from ..jobs import manager_for

    if args.model and not Path(args.model).exists():
        raise ConfigError(f"Model {args.model} does not exist; check the path.")
    factory = None
    if args.tiny:
        from ..models.tiny import build_tiny_bundle

        family = args.tiny

        def factory():
            return build_tiny_bundle(family)
    lora_dir = Path(args.lora_dir).expanduser().resolve()
    roots = [Path(d).expanduser().resolve() for d in args.allow] if args.allow else None
    if roots is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        roots = [lora_dir.parent]  # listening beyond loopback: never let strangers read the whole disk
        log.warning("Listening on %s: typed paths must stay inside %s (use --allow DIR to change)",
                    args.host, roots[0])
    host = StandaloneHost(lora_dir, model=args.model, bundle_factory=factory, allowed_roots=roots)
    jobs = manager_for(host, work_dir=Path(args.work_dir).expanduser().resolve() if args.work_dir else None)
    return host, jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_host_arguments(p, port=7870)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        from ..errors import MissingPackageError

        raise MissingPackageError("uvicorn", "The serve command") from None
    from ..api import create_app

    host, jobs = make_host(args)
    app = create_app(host, jobs)
    print(f"LoRA Trainer API on http://{args.host}:{args.port}/lora-trainer/v1/status "
          f"(LoRAs go to {host.lora_dir()})")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        jobs.shutdown()
    return 0
