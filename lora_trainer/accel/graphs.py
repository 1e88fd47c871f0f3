"""StepRunner: one training step (loss, backward, clip, optimizer) as a replayed CUDA graph.

An eager SD step launches ~5,000 kernels (~16,000 for SDXL) and the CPU, not the GPU, sets the
pace. Buckets give a handful of static batch shapes, so each shape is captured once and replayed:
one launch per step, the same kernels, the same numbers. Without CUDA (tests, CI) and whenever
capture is not safe, the same object runs the step eagerly.

The graphs' memory pool holds the step's activations between replays, idle. Eager work between steps
(the epoch's "did it learn?" scoring, sample images) runs inside `scratch()`, which allocates from that
pool (torch >= 2.8: `torch.cuda.MemPool`), on the stream the graphs were captured on, so that the run's peak
is the larger of the two rather than their sum (Flux's 12 GB preset: the scoring added 1.2-1.55 GiB to the
peak, bench/results/flux_vs_kohya_h100_pool.md). A replay overwrites the pool's free memory, so a tensor
made there that outlives the scratch work would be clobbered: `scratch` checks, and recaptures when it happens.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..torch_version import torch_at_least
from .options import AccelOptions

log = logging.getLogger(__name__)

Batch = dict[str, Any]
LossFn = Callable[[Batch], torch.Tensor]


@dataclass
class _Graph:
    graph: Any
    static: dict[str, torch.Tensor]
    loss: torch.Tensor
    lrs: list[torch.Tensor]
    grads: list[torch.Tensor | None] = field(default_factory=list)  # kept alive: they live in the pool


def _mem_pool_usable() -> bool:
    """A user-made MemPool can be both a graph's pool and the target of eager allocations (torch >= 2.8)."""
    return torch_at_least(2, 8) and hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool")


LITTLE_FREE = 2 * 2**30  # bytes: under this much free on the card, work between steps may run out of memory


def _little_free(device: torch.device) -> bool:
    """Less than LITTLE_FREE bytes free on the card (the driver's count, other processes included)."""
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except Exception:  # noqa: BLE001 - unknown: assume room, as before this check existed
        return False
    return free < LITTLE_FREE


def _pool_bytes(pool: Any) -> int:
    """Memory a MemPool holds (its segments), -1 where this torch cannot tell."""
    try:
        return sum(int(seg["total_size"]) for seg in pool.snapshot())
    except Exception:  # noqa: BLE001 - diagnostics only
        return -1


def _capturable_optimizer(opt: torch.optim.Optimizer) -> bool:
    if getattr(opt, "capturable_in_graphs", False):  # e.g. train.adamw8bit.AdamW8bit: no host syncs
        return True
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    return all(g.get("capturable", False) or g.get("fused", False) for g in opt.param_groups)


class StepRunner:
    """Runs `loss_fn(batch)` + backward + clip + `optimizer.step()` per call of `step`.

    `loss_fn` must be a pure function of the batch's tensors (see docs/internals.md, accel/).
    `stats` counts eager steps, replays and capture time, for the log and the benchmarks.
    """

    def __init__(self, loss_fn: LossFn, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 opts: AccelOptions | None = None, *, max_grad_norm: float = 0.0, scaler: Any = None,
                 device: torch.device | str | None = None):
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.opts = opts or AccelOptions()
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.scaler = scaler if (scaler is not None and getattr(scaler, "is_enabled", lambda: True)()) else None
        dev = torch.device(device) if device is not None else (self.params[0].device if self.params else
                                                             torch.device("cpu"))
        self.device = dev
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: dict[tuple, int] = {}
        self._pool: Any = None
        self._mempool: Any = None  # the graphs' pool as a MemPool, so eager work can use it (`scratch`)
        self._pending_grads = False
        self._side_stream: Any = None
        self._capture_stream: Any = None
        self.stats = {"eager_steps": 0, "graph_replays": 0, "graphs": 0, "capture_s": 0.0}
        self.disabled_reason = self._why_not_graphs()
        if self.disabled_reason:
            log.info("CUDA graphs off: %s", self.disabled_reason)

    # ------------------------------------------------------------------ public
    @property
    def uses_graphs(self) -> bool:
        return self.disabled_reason is None

    def step(self, batch: Batch, *, apply: bool = True) -> torch.Tensor:
        """One step; with `apply=False` only forward+backward (gradient accumulation; eager).

        Returns the loss as a device tensor (reading it with `.item()` waits for the GPU).
        """
        if not apply or self._pending_grads or not self.uses_graphs:
            return self._eager(batch, apply)
        key = self._key(batch)
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._seen.get(key, 0) + 1
            self._seen[key] = seen
            if seen <= self.opts.graph_warmup or len(self._graphs) >= self.opts.max_graphs:
                return self._eager(batch, apply, side_stream=True)
            entry = self._capture(key, batch)
            if entry is None:
                return self._eager(batch, apply)
        return self._replay(entry, batch)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[None]:
        """Eager GPU work between steps allocates from the graphs' pool (idle between replays) rather than beside
        it. Anything made here must be freed or moved off the GPU before it ends; if something stays, the graphs
        are dropped (captured again at the next step), since a replay would overwrite it."""
        pool = self._mempool
        if pool is None or not self._graphs:
            if self._graphs and _little_free(self.device):
                # torch < 2.8 (no MemPool): the work would allocate beside the pool; with little free memory
                # that can run out of it (Flux's scoring needs ~1.5 GiB at 1024 px), so the graphs and their pool
                # go, and the next step captures again (a second or two, instead of an out-of-memory error)
                log.info("little GPU memory free: CUDA graphs released for the work between steps, captured again "
                         "after it")
                self._drop_graphs()
                self._pool = None  # the next capture makes a new one
                torch.cuda.empty_cache()
            yield
            return
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        # the pool's size walks a snapshot of its blocks: only where the debug line is written
        debug = log.isEnabledFor(logging.DEBUG)
        reserved, in_pool = torch.cuda.memory_reserved(self.device), _pool_bytes(pool) if debug else -1
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        # On the stream the graphs were captured on: the allocator hands a free block only to the stream it was
        # made on, so on any other stream nothing of the pool is reused and it only grows (measured: +1.55 GiB
        # for Flux's scoring on the default stream, bench/results/flux_vs_kohya_h100_pool.md).
        stream = self._capture_stream or self._stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream), torch.cuda.use_mem_pool(pool, index):  # use_mem_pool wants an index
                yield
        finally:  # also when the work failed: whoever goes on must not replay over what it left
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)  # pending frees (other streams' uses) are done before any replay
            kept = torch.cuda.memory_allocated(self.device) - before
            if debug:
                log.debug("between steps: reserved %+.1f MiB (graphs' pool %+.1f MiB of %.1f), %d bytes kept",
                          (torch.cuda.memory_reserved(self.device) - reserved) / 2**20,
                          (_pool_bytes(pool) - in_pool) / 2**20, in_pool / 2**20, kept)
            if kept > 0:
                log.info("%d bytes made between steps stay on the GPU: CUDA graphs captured again", kept)
                self._drop_graphs()

    def _drop_graphs(self) -> None:
        """Forget every captured graph (the next step of each shape captures again, with no warm-up)."""
        self._graphs.clear()
        self.optimizer.zero_grad(set_to_none=True)  # their gradients live in their pool

    # ------------------------------------------------------------------ eager
    def _eager(self, batch: Batch, apply: bool, side_stream: bool = False) -> torch.Tensor:
        if not self._pending_grads:
            self.optimizer.zero_grad(set_to_none=True)  # graph-owned grads must not be accumulated into
        stream = None
        if side_stream and self.device.type == "cuda":
            # Warm-up off the default stream, as torch.cuda.graph expects before a capture
            stream = self._stream()
            stream.wait_stream(torch.cuda.current_stream(self.device))
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            loss = self.loss_fn(batch)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            if apply:
                if self.scaler is not None:
                    if self.max_grad_norm > 0:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self._clip()
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self._pending_grads = not apply
        self.stats["eager_steps"] += 1
        return loss

    def _stream(self) -> Any:
        """One side stream for all warm-ups: its cached blocks are reused rather than duplicated."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def _clip(self) -> None:
        if self.max_grad_norm > 0:
            # foreach: no host sync, so the same call is capturable
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)

    # ------------------------------------------------------------------ graphs
    def _why_not_graphs(self) -> str | None:
        if not self.opts.enabled or not self.opts.cuda_graphs:
            return "disabled in the options"
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return "no CUDA device"
        if self.scaler is not None and not all(g.get("fused", False) for g in self.optimizer.param_groups):
            # Only fused Adam/AdamW take the scaler's found-inf flag on the GPU; others read it on the host.
            return "fp16 loss scaling needs the fused AdamW to skip overflowed steps inside a graph"
        if not _capturable_optimizer(self.optimizer):
            return (f"{type(self.optimizer).__name__} is not capturable "
                    "(use torch Adam/AdamW with fused=True or capturable=True)")
        if not torch_at_least(2, 3):
            return "needs torch 2.3 or newer (tensor learning rates in fused optimizers)"
        return None

    @staticmethod
    def _key(batch: Batch) -> tuple:
        parts = []
        for k in sorted(batch):
            v = batch[k]
            if isinstance(v, torch.Tensor):
                parts.append((k, tuple(v.shape), v.dtype, v.device.type))
            else:
                parts.append((k, repr(v)))  # non-tensors are baked into the graph: part of the key
        return tuple(parts)

    def _sync_lrs(self, lrs: list[torch.Tensor]) -> None:
        for group, t in zip(self.optimizer.param_groups, lrs):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                if lr is not t:
                    t.copy_(lr)
            else:
                t.fill_(float(lr))

    def _capture(self, key: tuple, batch: Batch, *, mem_pool: bool = True) -> _Graph | None:
        t0 = time.perf_counter()
        if self._pool is None and mem_pool and _mem_pool_usable():
            self._mempool = torch.cuda.MemPool()
        pool = self._mempool.id if self._mempool is not None else self._pool
        groups = self.optimizer.param_groups
        saved_lrs = [g["lr"] for g in groups]
        try:
            static = {k: (v.to(self.device).clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            lrs = [torch.tensor(float(lr), dtype=torch.float32, device=self.device) for lr in saved_lrs]
            for g in groups:
                g["capturable"] = True
            for g, t in zip(groups, lrs):
                g["lr"] = t
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            # Hand the warm-up's cached blocks (cuDNN autotune workspaces, side-stream activations)
            # back, so the graph's private pool reuses that memory instead of adding to it.
            torch.cuda.empty_cache()
            graph = torch.cuda.CUDAGraph()
            capture = torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local")
            with capture:
                loss = self.loss_fn(static)
                if self.scaler is not None:
                    # GradScaler with a fused optimizer never syncs: the inf check, the skipped
                    # update and the scale's growth/backoff are all kernels, so they replay too.
                    self.scaler.scale(loss).backward()
                    if self.max_grad_norm > 0:
                        self.scaler.unscale_(self.optimizer)
                        self._clip()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self._clip()
                    self.optimizer.step()
                loss = loss.detach()
            grads = [p.grad for p in self.params]
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly from now on
            if self._mempool is not None and self._pool is None:  # the first capture, in a MemPool: once more without
                log.info("CUDA graph capture in a MemPool failed (%s); capturing in the graph's own pool", exc)
                self._mempool = None
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize(self.device)
                for g, lr in zip(groups, saved_lrs):
                    g["lr"] = lr
                return self._capture(key, batch, mem_pool=False)
            log.warning("CUDA graph capture failed, training continues without graphs: %s", exc)
            self.disabled_reason = f"capture failed: {type(exc).__name__}: {exc}"[:300]
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            return None
        finally:
            for g, lr in zip(groups, saved_lrs):
                g["lr"] = lr
        if self._pool is None:
            self._pool = pool if pool is not None else graph.pool()  # later shapes share it: replays never overlap
        # the pool's blocks belong to this stream (torch's capture stream, one per process): `scratch` works on it
        self._capture_stream = getattr(capture, "capture_stream", None)
        entry = _Graph(graph=graph, static=static, loss=loss, lrs=lrs, grads=grads)
        self._graphs[key] = entry
        self.stats["graphs"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0
        log.info("captured a CUDA graph for batch shape %s in %.2fs", key, time.perf_counter() - t0)
        return entry

    def _replay(self, entry: _Graph, batch: Batch) -> torch.Tensor:
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                entry.static[k].copy_(v, non_blocking=True)
        self._sync_lrs(entry.lrs)
        entry.graph.replay()
        self.stats["graph_replays"] += 1
        return entry.loss.clone()  # the static loss is overwritten by the next replay


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
