"""Data-parallel training: one process per GPU (NCCL), or per CPU slot (gloo), through torch.distributed.

The engine talks to a `Group`; a single process gets `SINGLE`, whose methods do nothing, so the
training loop has no branches for it. Under `--gpus N` or `torchrun` every process holds a
`DataParallel` group:

- Data: step k trains the k-th batch of the single-process order at batch size `batch_size x world`
  (the *global* batch): every rank draws the same random numbers for that whole batch (same seeds,
  same draws) and trains its slice of it (`take`). Slices are padded to one size with zero-weight
  copies, so every rank runs the same shapes (CUDA graphs, DDP's buckets) and the averaged gradient
  is exactly the single-process gradient of the global batch.
- Gradients: the LoRA parameters are all-reduced by torch's DistributedDataParallel (bucketed,
  overlapped with backward; the frozen base is ignored, so nothing of it is broadcast or reduced).
  Every rank runs the same optimizer step on the same averaged gradients.
- Control plane: a separate gloo group on the CPU with a long timeout carries everything that is not
  a gradient: the latent/text caches rank 0 builds once (`build_once`), the per-step agreement on the
  reported loss (`mean`) and on stopping (`any`: a signal on any rank stops all at the same step), and the
  barrier while rank 0 samples. Gradient collectives keep the data group's shorter timeout.
- Only rank 0 writes files, samples and reports progress (`is_main`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ..errors import ConfigError, LoraTrainerError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Gradient all-reduces wait at most this long for a peer (a step never takes minutes); the control
# group waits through rank-0-only work: caching a large dataset, sampling.
DATA_TIMEOUT = timedelta(minutes=10)
CONTROL_TIMEOUT = timedelta(hours=2)
# torch's recipe for DDP inside a captured CUDA graph: at least 11 DDP-enabled eager iterations first.
DDP_GRAPH_WARMUP = 11


class PeerFailed(LoraTrainerError):
    """Another process of the run failed; its own message is the one to show."""


class Group:
    """One process, no peers: every method is the identity (see the module docstring)."""

    world = 1
    rank = 0
    local_rank = 0
    backend = ""
    device: torch.device | None = None  # None: the engine picks the device itself

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def build_once(self, build: Callable[[], T]) -> T:
        return build()

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def wrap(self, loss_fn: Callable[[dict[str, Any]], torch.Tensor], modules: Sequence[torch.nn.Module]
             ) -> Callable[[dict[str, Any]], torch.Tensor]:
        return loss_fn

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def agree_max(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        return None

    def watch_peers(self, on_lost: Callable[[], None], interval: float = 0.5
                    ) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    @property
    def graph_warmup(self) -> int:
        return 0

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        return None


SINGLE = Group()


def env_world_size() -> int:
    """How many processes the launcher (`--gpus`, torchrun) started for this run; 1 outside one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def pick_device(setting: str, local_rank: int) -> torch.device:
    """The device of one rank: GPU `local_rank` (of those CUDA_VISIBLE_DEVICES shows), or the CPU."""
    setting = (setting or "auto").strip().lower()
    if setting not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"Device '{setting}' names one device, but every process of a multi-GPU run takes its "
                          "own; use --device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES.")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but torch sees no GPU; use --device cpu or install CUDA torch.")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"This run started more processes than the {count} GPU(s) torch sees; "
                          f"start at most {count} (--gpus {count}).")
    return torch.device("cuda", local_rank)


class DataParallel(Group):
    """This process's place in a data-parallel run (see the module docstring)."""

    def __init__(self, *, rank: int, world: int, local_rank: int, device: torch.device, backend: str,
                 control: Any):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.backend, self.control = device, backend, control
        self.ddp: Any = None
        self._synced = False  # a backward with DDP's all-reduce has run (see no_sync)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_env(cls, device_setting: str) -> DataParallel:
        """Join the run the launcher started (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = pick_device(device_setting, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            backend = "nccl" if dist.is_nccl_available() else "gloo"
        else:
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=DATA_TIMEOUT)
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        log.debug("rank %d of %d on %s (%s)", rank, world, device, backend)
        return cls(rank=rank, world=world, local_rank=local_rank, device=device, backend=backend, control=control)

    def describe(self) -> str:
        where = "GPUs" if self.device is not None and self.device.type == "cuda" else "CPU processes"
        return f"{self.world} {where} ({'NCCL' if self.backend == 'nccl' else self.backend})"  # as `--gpus` says

    def close(self) -> None:
        import torch.distributed as dist

        self.ddp = None
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a failed peer may have broken the groups already
                dist.destroy_process_group()

    # ------------------------------------------------------------------ caches, built by rank 0
    def build_once(self, build: Callable[[], T]) -> T:
        """Rank 0 runs `build()` and sends the result to every rank (pickled over the control group);
        the others wait meanwhile. If rank 0 fails, the others raise PeerFailed (rank 0 reports)."""
        import torch.distributed as dist

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", build())
            except BaseException as e:  # noqa: BLE001 - told to the others, then re-raised here
                error = e
                box[0] = ("error", f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(box, src=0, group=self.control)
        if error is not None:
            raise error
        status, value = box[0]
        if status != "ok":
            raise PeerFailed(f"Process 0 failed while preparing the data ({value}).")
        return value

    # ------------------------------------------------------------------ the data each rank trains
    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's slice of a batch built for the whole global batch.

        Per-sample tensors lead with the batch dimension n; anything else is 0-dim or has a leading
        dimension of 1 (left as is). Every rank gets ceil(n / world) samples: real ones weighted so that
        DDP's average equals the mean over the n samples, padding copies of sample 0 weighted 0.
        """
        if "weights" not in batch:
            raise RuntimeError("a training batch needs per-sample 'weights' for data-parallel slicing")
        n = int(batch["weights"].shape[0])
        per = -(-n // self.world)
        start = min(self.rank * per, n)
        real = list(range(start, min(start + per, n)))
        index = real + [0] * (per - len(real))
        indices: dict[torch.device, torch.Tensor] = {}
        sliced: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n and n > 1:
                if value.device not in indices:
                    indices[value.device] = torch.tensor(index, device=value.device)
                sliced[key] = value[indices[value.device]]
            else:
                sliced[key] = value
        mask = torch.tensor([1.0] * len(real) + [0.0] * (per - len(real)), device=batch["weights"].device,
                            dtype=batch["weights"].dtype)
        sliced["weights"] = sliced["weights"] * mask * (self.world * per / n)
        return sliced

    # ------------------------------------------------------------------ gradients: torch's DDP
    def wrap(self, loss_fn: Callable[[dict[str, Any]], torch.Tensor], modules: Sequence[torch.nn.Module]
             ) -> Callable[[dict[str, Any]], torch.Tensor]:
        """`loss_fn` run through DistributedDataParallel over `modules` (the parts holding LoRA weights).

        Only parameters that require grad (the LoRA's) are broadcast at start and all-reduced; the
        frozen base is ignored. static_graph: the same parameters take part every step, which lets DDP
        handle LoRA layers whose output the loss does not use (clip_skip) and checkpointing.
        On CUDA the DDP object is built on a side stream, as torch's CUDA-graph notes require.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        root = _LossModule(loss_fn, modules)
        frozen = [name for name, p in root.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in root.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(root, frozen)
        cuda = self.device is not None and self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            # (buffers are all ignored above, so none is synced: no broadcast_buffers, deprecated in torch 2.13)
            self.ddp = DDP(root, device_ids=[self.device.index] if cuda else None, gradient_as_bucket_view=True,
                           static_graph=True)
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            # DDP times its first 10 iterations and then every 100th with CUDA events it reads in the next
            # forward; events recorded inside a captured step would never run. Past the warm-up: never.
            if hasattr(self.ddp, "_set_ddp_runtime_logging_sample_rate"):
                self.ddp._set_ddp_runtime_logging_sample_rate(2**31 - 1)
        return self.ddp

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager[Any]:
        """Around the micro-batches of gradient accumulation but the last: no all-reduce for them.
        Not before one synced backward: static_graph learns the graph from the first one (torch asserts
        otherwise). All-reducing a micro-batch is correct too, only slower: the sum is the same."""
        if not accumulating:
            self._synced = True
        elif self.ddp is not None and self._synced:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    @property
    def graph_warmup(self) -> int:
        return DDP_GRAPH_WARMUP

    # ------------------------------------------------------------------ control plane
    def mean(self, value: float) -> float:
        """The mean over the ranks: after each step, the loss of the global batch (each rank's loss is
        weighted so that this mean is the single-process loss)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return float(t[0]) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank if it is on any: a stop asked on one rank stops all after the same step."""
        return self.agree_max(int(flag)) > 0

    def agree_max(self, value: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t[0])

    def barrier(self) -> None:
        """Wait for every rank on the control group (e.g. while rank 0 samples)."""
        import torch.distributed as dist

        dist.barrier(group=self.control)

    @contextlib.contextmanager
    def watch_peers(self, on_lost: Callable[[], None], interval: float = 0.5, grace: float = 30.0
                    ) -> Iterator[None]:
        """Call `on_lost()` (from a daemon thread) when another process of the run on this machine has
        been gone for `grace` seconds. gloo notices a dead peer at once and the run fails normally
        (a save in progress finishes first); a rank blocked in an NCCL all-reduce with a dead peer would
        otherwise wait for the collective's timeout. Leave the block only once no rank can exit early
        (the engine ends with a barrier), and pass a collective before exiting (`agree_max`), so that a
        normal end is never taken for a loss."""
        import socket

        import torch.distributed as dist

        peers: list[Any] = [None] * self.world
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=self.control)
        mine = socket.gethostname()
        pids = [pid for rank, (host, pid) in enumerate(peers) if rank != self.rank and host == mine]
        with _watching("peer-watch", lambda: any(not _alive(pid) for pid in pids), on_lost, interval, grace):
            yield


class _LossModule(torch.nn.Module):
    """The modules DDP watches, with the engine's loss function as forward."""

    def __init__(self, loss_fn: Callable[[dict[str, Any]], torch.Tensor], modules: Sequence[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._loss_fn(batch)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (cannot happen for our own workers)
        return True
    try:  # a dead child not yet reaped by its launcher is a zombie: gone for us
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another process died or hung (its own error is the one to report)."""
    if isinstance(e, PeerFailed):
        return True
    backend_error = getattr(torch.distributed, "DistBackendError", None)
    if backend_error is not None and isinstance(e, backend_error):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
        "NCCL communicator was aborted", "ProcessGroupNCCL", "ProcessGroupGloo", "gloo/transport"))


@contextlib.contextmanager
def watch_parent(on_gone: Callable[[], None], interval: float = 0.5) -> Iterator[None]:
    """Call `on_gone()` (from a daemon thread) if the launcher that started this process goes away:
    killed, or aborted by a second Ctrl+C while the workers were still saving."""
    parent = os.getppid()
    with _watching("launcher-watch", lambda: os.getppid() != parent, on_gone, interval):
        yield


@contextlib.contextmanager
def _watching(name: str, gone: Callable[[], bool], on_gone: Callable[[], None], interval: float,
              grace: float | None = None) -> Iterator[None]:
    """While the block runs, a daemon thread checks `gone()` every `interval` seconds; once it is true,
    it calls `on_gone()` (with a `grace`: after that many seconds more, unless the block has ended by
    then) and stops."""
    import threading

    done = threading.Event()

    def watch() -> None:
        while not done.wait(interval):
            if gone():
                if grace is None or not done.wait(grace):
                    on_gone()
                return

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


# ---------------------------------------------------------------------- settings across process counts
def check_processes(config: Any, dist: Group, *, hosted: bool) -> None:
    """Refuse a multi-GPU setting where only one process trains (a WebUI, the server, the API)."""
    if dist.world > 1:
        if hosted:
            raise ConfigError("A model handed over by a host trains in that host's process on one GPU; "
                              "train from a checkpoint file for several GPUs.")
        if config.processes != dist.world:
            raise ConfigError(f"The settings ask for {config.processes} process(es) but the launcher started "
                              f"{dist.world}; start as many as the settings say (--gpus {config.processes}).")
    elif config.processes > 1:
        from ..launch import one_process_here

        raise ConfigError(one_process_here(config.processes))


def match_resume(config: Any) -> Any:
    """Resuming onto another number of processes: keep the stopped run's images per step.

    A run of 2 GPUs x batch 4 stopped at some step continues exactly on 1 GPU only with batch 8 (the
    data order and the steps are those of the global batch). With the stopped run's per-process batch
    unchanged, it is adjusted here; an explicit batch that cannot match is refused.
    """
    import dataclasses
    import json
    from pathlib import Path

    if not config.resume:
        return config
    try:
        saved = json.loads((Path(config.resume) / "config.json").read_text(encoding="utf-8"))
        batch, processes = int(saved.get("batch_size", 1)), max(1, int(saved.get("processes", 1)))
    except (OSError, ValueError, TypeError, AttributeError):
        return config  # no readable settings beside the state: load_state reports what is wrong
    images = batch * processes
    if images == config.global_batch_size:
        return config
    if config.batch_size == batch and images % config.processes == 0:
        per = images // config.processes
        log.warning("The stopped run trained %d images per step (%d process(es) x batch %d); resuming on %d "
                    "process(es) with batch %d each, so it continues exactly.", images, processes, batch,
                    config.processes, per)
        return dataclasses.replace(config, batch_size=per)
    fits = f" (batch {images // config.processes} each)" if images % config.processes == 0 else ""
    raise ConfigError(f"The stopped run trained {images} images per step ({processes} process(es) x batch "
                      f"{batch}), this one would train {config.global_batch_size}; resume with a batch size that "
                      f"keeps {images} on {config.processes} process(es){fits}, or on {processes} process(es).")
