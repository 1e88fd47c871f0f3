"""`python -m lora_trainer serve`: the HTTP API (/lora-trainer/v1) on its own, with uvicorn.

Stop signals (Ctrl+C, SIGTERM from `kill`/systemd/Docker, SIGHUP) stop gracefully: new jobs are
refused, queued ones dropped, the running one finishes its step and saves its LoRA and state (its
record says "stopped", Resume continues it after a restart), then the server exits — with 128 +
the signal's number when it stopped a running job, 0 when it was idle. A second signal aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

HELP = "Run the HTTP API (/lora-trainer/v1) without a WebUI (listens on 127.0.0.1 by default)."
AUTH_ENV = "LORA_TRAINER_API_AUTH"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
EPILOG = ("Security: on 127.0.0.1 without --allow, a request may name any folder this user can read or "
          "write (its images are read, captions and datasets written there); use --allow DIR to confine "
          "requests. Listening beyond this machine (--listen, --host) needs --api-auth (or "
          f"${AUTH_ENV}), or --insecure-no-auth for a trusted network; typed paths then stay inside "
          "--allow folders, by default the Lora folder's parent. Ctrl+C or SIGTERM stops the running "
          "job after its step, saved and resumable.")

log = logging.getLogger(__name__)


def add_host_arguments(p: argparse.ArgumentParser, *, port: int) -> None:
    """Options shared by `serve` and `ui`: where LoRAs go, which model trains, who may connect."""
    p.epilog = EPILOG
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: only this machine; anything else needs "
                        "--api-auth or --insecure-no-auth)")
    p.add_argument("--listen", action="store_true", help="listen on every network interface (= --host 0.0.0.0)")
    p.add_argument("--port", type=int, default=port, metavar="N", help=f"port (default {port}; 0 = any free port)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASSWORD",
                   help="require this user name and password (HTTP basic auth for the API, a login page for "
                        f"the tab; several: comma-separated, as the WebUI's --api-auth); also read from ${AUTH_ENV}")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow listening beyond 127.0.0.1 without --api-auth (only on a network you trust)")
    p.add_argument("--lora-dir", default="models/Lora", metavar="DIR", help="where finished LoRAs go (default models/Lora)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="run folders, uploads and prepared datasets (default: lora_trainer_runs beside the "
                        "Lora folder)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, metavar="CKPT", help="checkpoint (.safetensors/.ckpt) or diffusers folder to train on "
                       "(default: each request's \"model\")")
    group.add_argument("--tiny", choices=("sd1", "sd2", "sdxl"), default=None,
                       help="train a tiny random model (for trying the API or tab; the LoRA is useless)")
    p.add_argument("--allow", action="append", default=None, metavar="DIR",
                   help="only allow typed paths inside DIR (repeatable). Default on 127.0.0.1: every path this "
                        "user can reach; beyond it: the Lora folder's parent")


def _listen_address(args: argparse.Namespace) -> str:
    return "0.0.0.0" if getattr(args, "listen", False) else args.host


def auth_credentials(args: argparse.Namespace) -> dict[str, str]:
    """{user: password} from --api-auth or $LORA_TRAINER_API_AUTH; refuses beyond loopback without them."""
    from ..auth import parse_api_auth_strict
    from ..errors import ConfigError

    value = getattr(args, "api_auth", None) or os.environ.get(AUTH_ENV) or ""
    creds = parse_api_auth_strict(value) if value.strip() else {}
    address = _listen_address(args)
    if address not in LOOPBACK and not creds and not getattr(args, "insecure_no_auth", False):
        raise ConfigError(f"Listening on {address} without a password lets anyone on the network start jobs and "
                          "read your folders; add --api-auth USER:PASSWORD, or --insecure-no-auth if this "
                          "network is trusted.")
    return creds


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
    address = _listen_address(args)
    if roots is None and address not in LOOPBACK:
        roots = [lora_dir.parent]  # listening beyond loopback: never let strangers read the whole disk
        log.warning("Listening on %s: typed paths must stay inside %s (use --allow DIR to change)",
                    address, roots[0])
    host = StandaloneHost(lora_dir, model=args.model, bundle_factory=factory, allowed_roots=roots)
    jobs = manager_for(host, work_dir=Path(args.work_dir).expanduser().resolve() if args.work_dir else None)
    return host, jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_host_arguments(p, port=7870)


def bind_socket(address: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a busy port is a one-line error, not a traceback."""
    from ..errors import ConfigError

    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"Cannot listen on {address}: {e.strerror or e}; use --host 127.0.0.1 or a "
                          "valid address of this machine.") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"Cannot listen on {address} port {port}: {e.strerror or e}; pick another port with "
                          "--port (another server may be using it).") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, log_level: str = "info") -> Any:
    """A uvicorn Server that leaves the stop signals to us (it would re-raise SIGTERM after shutting
    down, which kills the process before the running job has saved)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn >= 0.29
            yield

        def install_signal_handlers(self) -> None:  # older uvicorn
            pass

    return Server(uvicorn.Config(app, log_level=log_level))


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        from ..errors import MissingPackageError

        raise MissingPackageError("uvicorn", "The serve command") from None
    from ..api import create_app
    from ..auth import basic_auth_dependency
    from ..signals import GracefulStop, safe_streams, signal_name

    creds = auth_credentials(args)
    address = _listen_address(args)
    host, jobs = make_host(args)
    sock = bind_socket(address, args.port)
    app = create_app(host, jobs, auth=basic_auth_dependency(creds))
    # uvicorn's startup lines and per-request access log only with -v: our own line below says where it listens
    server = _uvicorn_server(app, log_level="info" if getattr(args, "verbose", False) else "warning")
    port = sock.getsockname()[1]
    stopped_jobs: list[str] = []
    dropped: list[str] = []  # queued jobs that never started (nothing of theirs to save)

    def drain() -> None:  # off the signal handler: the running job may take a while to save
        jobs.shutdown(timeout=None)
        server.should_exit = True

    def on_stop(signum: int) -> None:
        current = jobs.current()
        if current is not None and current.state == "running":
            stopped_jobs.append(current.id)
        dropped.extend(job.id for job in jobs.queued() if not job.resumed_from)
        threading.Thread(target=drain, name="lora-trainer-drain", daemon=True).start()

    def message(signum: int) -> str:
        current = jobs.current()
        what = (f"stopping job {current.id} after this step and saving it (resumable)" if current is not None
                else "shutting down")
        return f"{signal_name(signum)} received: {what}; send it again to abort."

    where = f"http://{address}:{port}/lora-trainer/v1/status"
    print(f"LoRA Trainer API on {where} (LoRAs go to {host.lora_dir()}"
          f"{'; HTTP basic auth on' if creds else ''})", flush=True)
    with safe_streams(), GracefulStop(on_stop, message=message) as stopper:
        try:
            server.run(sockets=[sock])
        except BaseException:  # a second signal (abort) or a crash: do not wait for the job
            jobs.shutdown(timeout=0)
            raise
        jobs.shutdown(timeout=None)  # returns at once after a drain
    saved = [i for i in stopped_jobs if jobs.get(i).state_dir]
    if saved:
        print(f"Stopped job {', '.join(saved)} and saved it; after a restart, POST "
              f"/lora-trainer/v1/jobs/<id>/resume continues it.", flush=True)
    dropped += [i for i in stopped_jobs if i not in saved]  # stopped before its first step: nothing saved
    if dropped:
        print(f"{len(dropped)} job(s) did not start training ({', '.join(dropped)}); send them again after the "
              "restart.", flush=True)
    if stopper.signum is not None and stopped_jobs:
        return stopper.exit_code or 1
    return 0
