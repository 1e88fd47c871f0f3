"""Several GPUs from the command line: `train --gpus N` (or `torchrun --nproc_per_node N -m lora_trainer train`).

`train --gpus N` starts N copies of `python -m lora_trainer train --config <settings>` through torch's
own elastic launcher (`torch.distributed.launcher.api.elastic_launch`, the engine behind torchrun):
rendezvous on a free local port, one process per GPU, no restarts. Each copy, ours or torchrun's,
finds WORLD_SIZE in its environment and joins the run as one rank (`run_worker`): the training itself
is `train.distributed` + the engine.

Stopping: Ctrl+C, SIGTERM or SIGHUP reach the launcher, which forwards the signal once to every
worker (each runs in its own session, so a terminal's Ctrl+C does not reach them twice); the ranks
agree on the step to stop after, rank 0 saves the LoRA and the resumable state, all exit with 128 +
the signal's number. A second signal on the launcher aborts: it leaves, and the workers, which watch
it, exit at once without saving.

Failures: a worker that fails records one line in torch elastic's error file (TORCHELASTIC_ERROR_FILE)
and exits 2 (our errors), 1 (unexpected) or 3 (a peer failed first); the launcher stops the others and
prints the root cause as one line, exit 2. Files are only ever written whole (temporary name, then
renamed), so a run that fails leaves no partial file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import ConfigError, LoraTrainerError

log = logging.getLogger(__name__)

ENV_LAUNCHER = "LORA_TRAINER_LAUNCHER"  # set by `--gpus`: workers leave error lines to the launcher
EXIT_ERROR, EXIT_CRASH, EXIT_PEER = 2, 1, 3
# How long the launcher lets workers finish a graceful stop (the step, the LoRA and the state;
# a round of samples if one is running) before killing them. torch < 2.4 has a fixed 30 s.
SHUTDOWN_TIMEOUT_S = 300


def one_process_here(n: int) -> str:
    """Why a WebUI, `serve` or `ui` job cannot use `n` GPUs, and what to do instead."""
    return (f"Training here runs in one process on one GPU, and these settings ask for {n} (processes); set "
            "processes to 1 to train here, or train on several GPUs from a terminal: "
            f"python -m lora_trainer train --gpus {n} --config <settings file>.")


# ---------------------------------------------------------------------- CLI options
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpus", metavar="N", help="train on N GPUs of this machine (or 'all'): one process per GPU, "
                   "data parallel through torch.distributed; --batch-size is per GPU. Pick GPUs with "
                   "CUDA_VISIBLE_DEVICES")
    g.add_argument("--processes", type=int, metavar="N", help="data-parallel training processes: one per GPU, "
                   "or with --device cpu N CPU processes (gloo), to try a multi-GPU setup without GPUs")


def apply_arguments(args: argparse.Namespace, config: TrainConfig) -> TrainConfig:
    """`--gpus N|all` / `--processes N` onto the settings (`processes`, and the device for --gpus)."""
    gpus = getattr(args, "gpus", None)
    if gpus is not None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if str(gpus).strip().lower() == "all":
            if count == 0:
                raise ConfigError("--gpus all found no GPU (torch sees none); install CUDA torch, or train "
                                  "on the CPU without --gpus.")
            config.processes = count
        else:
            try:
                config.processes = int(gpus)
            except ValueError as e:
                raise ConfigError(f"--gpus takes a number of GPUs or 'all', not '{gpus}'; e.g. --gpus 2.") from e
        if config.device.strip().lower() == "cpu":
            raise ConfigError(f"--gpus asks for GPUs but --device is cpu; use --processes {config.processes} "
                              "--device cpu for CPU processes, or drop --device cpu.")
        if count == 0 and config.processes > 1:
            raise ConfigError(f"--gpus {config.processes} found no GPU (torch sees none); install CUDA torch, or "
                              f"try the same run as CPU processes with --processes {config.processes} --device cpu.")
        if config.device.strip().lower() == "auto":
            config.device = "cuda"
    elif getattr(args, "processes", None) is not None:
        config.processes = int(args.processes)
    return config


def handle(config: TrainConfig, args: argparse.Namespace) -> int | None:
    """The train command's multi-process part: this process is one rank of a run (torchrun or `--gpus`),
    or it launches one; None when neither (a plain single-process run)."""
    from .train.distributed import env_world_size

    if env_world_size() > 1:
        return run_worker(config, verbose=bool(getattr(args, "verbose", False)))
    if config.processes > 1:
        return launch(config, verbose=bool(getattr(args, "verbose", False)))
    return None


# ---------------------------------------------------------------------- the launcher
def _kind(config: TrainConfig) -> str:
    """'cuda' or 'cpu': what the workers will train on; refuses what cannot start."""
    import torch

    from .train.distributed import pick_device

    pick_device(config.device, 0)  # refuses a device the workers could not split
    n, device = config.processes, config.device.strip().lower()
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    count = torch.cuda.device_count()
    if n > count:
        raise ConfigError(f"The run asks for {n} GPUs but torch sees {count}; use --gpus {count} (a stopped run "
                          f"resumes on fewer GPUs with the same images per step), or free GPUs.")
    return "cuda"


def launch(config: TrainConfig, *, verbose: bool = False) -> int:
    """Start `config.processes` workers through torch's elastic launcher; their exit status, or 2 with
    one line naming the first failure."""
    from .signals import exit_code, signal_name
    from .train import plan_training

    kind = _kind(config)
    plan_training(config)  # bad settings or data fail here, once, before N processes load the model
    n = config.processes
    where = "GPUs (NCCL)" if kind == "cuda" else "CPU processes (gloo)"
    print(f"Data parallel on {n} {where}: batch {config.batch_size} per process, {config.global_batch_size} "
          "images per step.", flush=True)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with tempfile.TemporaryDirectory(prefix="lora-trainer-run-") as tmp:
        settings = Path(tmp) / "settings.json"
        config.save(settings)
        argv = ["-m", "lora_trainer", *(["-v"] if verbose else []), "train", "--config", str(settings)]
        with _worker_environment(n, kind), _quiet_elastic(verbose):
            try:
                _elastic_launch(n, Path(tmp) / "logs")(*argv)
            except SignalException as e:
                if isinstance(e.__context__, SignalException):  # a second signal while workers were saving
                    print(f"aborted by a second {signal_name(e.sigval)}; the processes stop without saving",
                          file=sys.stderr, flush=True)
                return exit_code(e.sigval)
            except ChildFailedError as e:
                return _report_failure(e, n)
    return 0


def _elastic_launch(n: int, log_dir: Path) -> Any:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    fields = LaunchConfig.__dataclass_fields__
    extra: dict[str, Any] = {}
    if "logs_specs" in fields:  # torch >= 2.3: error files and logs under our own temporary folder
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

        extra["logs_specs"] = DefaultLogsSpecs(log_dir=str(log_dir))
    else:
        extra["log_dir"] = str(log_dir)
    if "shutdown_timeout" in fields:
        extra["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"lora-trainer-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          start_method="spawn", **extra)
    return elastic_launch(config, entrypoint=sys.executable)


@contextlib.contextmanager
def _worker_environment(n: int, kind: str):
    """What the workers inherit: the launcher flag, and CPU threads shared out as torchrun does."""
    saved = {k: os.environ.get(k) for k in (ENV_LAUNCHER, "OMP_NUM_THREADS")}
    os.environ[ENV_LAUNCHER] = "1"
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n) if kind == "cpu" else 1)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_elastic(verbose: bool):
    """torch elastic logs each signal and failure (several lines each); we print one line instead."""
    if verbose:
        yield
        return
    import torch.distributed.elastic.agent.server.api
    import torch.distributed.launcher.api  # noqa: F401 - with these, elastic's loggers exist

    names = [name for name in logging.root.manager.loggerDict
             if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))]
    names += ["torch.distributed.elastic", "torch.distributed.launcher"]
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _report_failure(error: Any, n: int) -> int:
    """One line for the user from torch elastic's ChildFailedError; the exit status."""
    from .signals import exit_code, signal_name

    failures = error.failures  # global rank -> ProcessFailure
    records = {rank: (f.error_file_data or {}).get("lora_trainer") or {} for rank, f in failures.items()}
    stop_codes = {exit_code(s) for s in _stop_signals()}
    if all(f.exitcode in stop_codes and not records[r] for r, f in failures.items()):
        return max(f.exitcode for f in failures.values())  # a signal sent to workers stopped the run cleanly
    candidates = [r for r, rec in records.items() if rec.get("kind") in ("error", "crash")]
    if candidates:
        rank = min(candidates, key=lambda r: records[r].get("time", 0.0))
        message = records[rank]["message"]
        same = {records[r]["message"] for r in candidates}
        prefix = "" if len(same) == 1 and len(candidates) == n else f"process {rank} of {n} failed: "
        print(f"error: {prefix}{message}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    # No message recorded: a process was killed (out of memory, a signal) or died in native code.
    first = error.get_first_failure()[1]
    primary = [r for r, f in failures.items() if records[r].get("kind") != "peer"
               and f.exitcode not in (-signal.SIGTERM, exit_code(signal.SIGTERM))]
    rank = min(primary, key=lambda r: failures[r].timestamp) if primary else first.local_rank
    f = failures.get(rank, first)
    if f.exitcode < 0:
        name = signal_name(-f.exitcode)
        hint = (" (often the system running out of memory: lower the batch size or use fewer processes)"
                if -f.exitcode == getattr(signal, "SIGKILL", 9) else "")
        cause = f"was killed by {name}{hint}"
    else:
        cause = f"ended with exit status {f.exitcode}"
    print(f"error: process {rank} of {n} {cause}; the run was stopped and nothing more was saved. "
          "Run again with -v for each process's details.", file=sys.stderr, flush=True)
    return EXIT_ERROR


def _stop_signals() -> tuple[int, ...]:
    from .signals import STOP_SIGNALS

    return STOP_SIGNALS


# ---------------------------------------------------------------------- one rank of a run
def run_worker(config: TrainConfig, *, verbose: bool = False) -> int:
    """Train as one process of a data-parallel run started by `--gpus` or torchrun, then end the process
    with its exit status (see `_leave`)."""
    from .commands.train import _print_event
    from .signals import Aborted, GracefulStop, exit_code, safe_streams, signal_name
    from .train import run_training
    from .train.distributed import DataParallel, env_world_size, is_peer_failure, watch_parent

    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    under_launcher = os.environ.get(ENV_LAUNCHER) == "1"
    _own_session()
    dist = None
    try:
        if config.processes not in (1, world):
            raise ConfigError(f"The settings ask for {config.processes} processes but {world} were started; "
                              f"drop --gpus/--processes under torchrun, or start {config.processes}.")
        config = dataclasses.replace(config, processes=world)
        dist = DataParallel.from_env(config.device)
        if not dist.is_main and not verbose:
            logging.getLogger("lora_trainer").setLevel(logging.WARNING)  # one copy of the log: rank 0's
        if dist.is_main and not under_launcher:  # under torchrun: the line `--gpus` prints before starting us
            print(f"Data parallel on {dist.describe()}: batch {config.batch_size} per process, "
                  f"{config.global_batch_size} images per step.", flush=True)
        stop = threading.Event()

        def on_stop(signum: int) -> None:
            stop.set()
            # SIGTERM is also how a launcher ends the survivors of a failed process: no message for it
            if dist.is_main and signum != signal.SIGTERM:
                with contextlib.suppress(OSError, ValueError):
                    print(f"{signal_name(signum)} received: every process stops after this step; the LoRA and a "
                          "resumable state are saved (send it again to abort without saving)...",
                          file=sys.stderr, flush=True)

        def peer_lost() -> None:
            _record_failure("peer", "another process of the run ended", rank, None)
            os._exit(EXIT_PEER)

        # The launcher gone (killed, or a second Ctrl+C while we save): leave now, as an abort would.
        with watch_parent(lambda: os._exit(exit_code(signal.SIGTERM))), safe_streams(), \
                GracefulStop(on_stop, keep_ignored=False) as stopper:  # the launcher forwards on purpose
            with dist.watch_peers(peer_lost):  # a peer gone: leave at once instead of waiting in a collective
                result = run_training(config, on_event=_print_event, stop=stop, dist=dist)
            signum = dist.agree_max(stopper.signum or 0)  # which signal stopped the run; the last collective
        if dist.is_main:
            if result.stopped:
                print(f"Stopped at step {result.steps}: LoRA {result.lora_path}; continue with "
                      f"--resume {result.state_dir}", flush=True)
            else:
                print(f"LoRA: {result.lora_path}", flush=True)
        code = (exit_code(signum) if signum else exit_code(signal.SIGTERM)) if result.stopped else 0
    except Aborted as e:
        code = exit_code(e.signum)
    except Exception as e:  # every failure becomes one recorded line
        if is_peer_failure(e):
            kind, code, message = "peer", EXIT_PEER, "another process of the run failed"
        elif isinstance(e, LoraTrainerError):
            kind, code, message = "error", EXIT_ERROR, str(e)
        else:
            kind, code = "crash", EXIT_CRASH
            message = f"unexpected {type(e).__name__}: {e}; run again with -v for the traceback"
        log.debug("process %d of %d failed", rank, world, exc_info=True)
        _record_failure(kind, message, rank, e)
        if kind != "peer" and not under_launcher:  # torchrun prints its own summary beside ours
            print(f"error: [process {rank} of {world}] {message}", file=sys.stderr, flush=True)
    finally:
        if dist is not None:
            dist.close()
    return _leave(code)  # `dist` stays referenced by this frame until the process ends


def _leave(code: int) -> int:
    """End a worker process now, its files written and its output flushed, skipping Python's teardown.
    There, releasing the last references to the process groups (`run_worker`'s, held until here) runs
    torch's C++ destructors with the GIL held, and once (torch 2.1.2, gloo, a resumed CPU run in CI) a
    worker blocked for good at `run_worker`'s return, every other thread frozen: the LoRA was saved, but
    the launcher waited on the process until the test's timeout killed it."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
    return code  # not reached


def _own_session() -> None:
    """Leave the terminal's process group, so that its Ctrl+C reaches only the launcher, which forwards
    it once (torch >= 2.2 starts workers in their own session already; older ones do not)."""
    if hasattr(os, "setsid") and os.environ.get("TORCHELASTIC_RUN_ID"):
        with contextlib.suppress(OSError):
            os.setsid()


def _record_failure(kind: str, message: str, rank: int, e: BaseException | None) -> None:
    """torch elastic's error file: the launcher (ours or torchrun) reads the message from it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": message, "timestamp": int(time.time()),
            "lora_trainer": {"kind": kind, "message": message, "rank": rank, "time": time.time(),
                             "traceback": "" if e is None else
                             "".join(traceback.format_exception(type(e), e, e.__traceback__))}}
    with contextlib.suppress(OSError):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data), encoding="utf-8")
