"""Block swap: stream the frozen weights of some transformer blocks from pinned host memory to the GPU
as the forward and backward passes reach them, so a model larger than the card trains on it.

Generic over any list of blocks (a ModuleList) that run in order in forward and in reverse order in
backward (Flux's double/single blocks, any DiT). How it works:

- The *frozen* tensors of each swapped block (base weights, fp8 data and scales, buffers) are packed
  once into one pinned host buffer per block. Trainable tensors (LoRA A/B) stay on the GPU.
- The GPU holds `slots` (default 2) slot buffers. Swapped block number j (in execution order) always
  uses slot j mod slots; its frozen tensors are views into that slot, so blocks sharing a slot share
  the memory and one host-to-device copy (a single large memcpy) makes a block ready.
- Copies run on a side stream and are ordered with the compute stream by CUDA events only: a block's
  compute waits for its copy; a copy into a slot waits until the slot's previous block has finished
  with it (in forward: after its forward; in backward: after its whole backward). The CPU never waits
  for the GPU, and each copy overlaps the compute of the blocks before it.
- Only host-to-device copies: the host copy is the source of truth (the weights are frozen), so
  nothing is written back. Kohya's swap moves each block both ways and synchronises the GPU per swap.
- Nothing in a step depends on the host: the whole step (copies, events, compute) can be captured in
  one CUDA graph and replayed (accel.StepRunner). A step starts and ends with the first `slots`
  swapped blocks in their slots; `prepare()` restores that after anything else ran (sampling).

Backward ordering: each swapped block's inputs pass through an identity autograd function (`_In`)
tied to a small `anchor` tensor that requires grad, so that function's backward runs only after every
backward kernel of the block has been enqueued, whatever the block's inputs require; its output goes
through `_Out`, whose backward runs before any of the block's backward kernels (it waits there for the
block's weights). With gradient checkpointing the block's recomputation runs between the two.

On the CPU (tests) the same schedule runs with synchronous copies: the arithmetic is identical with
and without swapping, which is what the tests check.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_ALIGN = 256  # bytes: every tensor in a slot starts on a 256-byte boundary (any dtype view is aligned)


def spread(n_blocks: int, n_swap: int) -> list[int]:
    """`n_swap` block indices out of `n_blocks`, evenly spread (resident blocks between swapped ones give
    each copy compute to hide behind)."""
    n_swap = max(0, min(n_swap, n_blocks))
    if n_swap == 0:
        return []
    return sorted({min(n_blocks - 1, int((i + 0.5) * n_blocks / n_swap)) for i in range(n_swap)})


class _Ref:
    """Where a frozen tensor lives, so its storage can be replaced by a slot view."""

    def __init__(self, owner: Any, name: str, kind: str):
        self.owner, self.name, self.kind = owner, name, kind

    def get(self) -> torch.Tensor:
        if self.kind == "param":
            return self.owner._parameters[self.name]
        if self.kind == "buffer":
            return self.owner._buffers[self.name]
        return getattr(self.owner, self.name)

    def set(self, value: torch.Tensor) -> None:
        if self.kind == "param":
            self.owner._parameters[self.name].data = value
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = value
        else:
            setattr(self.owner, self.name, value)


def frozen_refs(block: nn.Module) -> list[_Ref]:
    """Every frozen tensor of `block`: parameters that need no grad, buffers, and the stored tensors of
    `quant.QuantLinear` weights (its `frozen` object's tensor attributes)."""
    refs: list[_Ref] = []
    seen: set[int] = set()

    def add(ref: _Ref) -> None:
        t = ref.get()
        if isinstance(t, torch.Tensor) and id(t) not in seen and t.numel() > 0:
            seen.add(id(t))
            refs.append(ref)

    for mod in block.modules():
        for name, p in mod._parameters.items():
            if p is not None and not p.requires_grad:
                add(_Ref(mod, name, "param"))
        for name, b in mod._buffers.items():
            if b is not None:
                add(_Ref(mod, name, "buffer"))
        frozen = mod.__dict__.get("frozen")
        if frozen is not None and hasattr(frozen, "storage"):
            for name, value in vars(frozen).items():
                if isinstance(value, torch.Tensor):
                    add(_Ref(frozen, name, "attr"))
    return refs


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    # `.data`: same memory, its own version counter, so refilling a slot never trips autograd's check
    # on tensors saved for backward (the schedule guarantees the right block is there by then).
    return buf[offset:offset + _nbytes(like)].view(like.dtype).view(like.shape).data


class _In(torch.autograd.Function):
    @staticmethod
    def forward(ctx, swapper, j, anchor, *args):  # type: ignore[override]
        ctx.swapper, ctx.j = swapper, j
        return tuple(a.view_as(a) for a in args)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.swapper._backward_done(ctx.j)
        return (None, None, None, *grads)


class _Out(torch.autograd.Function):
    @staticmethod
    def forward(ctx, swapper, j, *outs):  # type: ignore[override]
        ctx.swapper, ctx.j = swapper, j
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.swapper._backward_start(ctx.j)
        return (None, None, *grads)


def _gated(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwapper:
    """Swap the blocks at `swap` (indices into `blocks`) through `slots` device buffers (see the module
    docstring). The blocks' other tensors and the resident blocks are the caller's to place.
    `remove()` puts every swapped tensor back on `device` (or `to`) as an ordinary tensor."""

    def __init__(self, blocks: Sequence[nn.Module], swap: Iterable[int], device: torch.device | str, *,
                 slots: int = 2, pin: bool | None = None, name: str = "blocks",
                 prepare: Callable[[int, nn.Module], None] | None = None):
        """`prepare(index, block)`, if given, is called for each swapped block just before it is packed
        (e.g. cast or quantise it on the device), so only one such block is ever whole on the device."""
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.order = sorted({int(i) for i in swap})
        if any(i < 0 or i >= len(self.blocks) for i in self.order):
            raise ValueError(f"swap indices {self.order} out of range for {len(self.blocks)} blocks")
        self.name = name
        self.k = max(1, min(int(slots), len(self.order)))
        cuda = self.device.type == "cuda"
        self._pin = cuda if pin is None else pin
        self._refs: list[list[_Ref]] = []
        self._offsets: list[list[int]] = []
        self._host: list[_HostBuffer] = []
        self._slots: list[torch.Tensor] = []
        self.slot_bytes = 0
        self.host_bytes = 0
        for i in self.order:
            if prepare is not None:
                prepare(i, self.blocks[i])
            self._pack(self.blocks[i])
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._owner: list[int | None] = [None] * self.k  # swapped index each slot holds (or is loading)
        self._loaded: dict[int, Any] = {}  # swapped index -> event after its copy (CUDA) or True
        self._free: list[Any] = [None] * self.k  # event after the slot's last reader
        self.anchor = torch.zeros((), device=self.device, requires_grad=True)
        self.copies = 0
        self._handles = []
        for j, i in enumerate(self.order):
            block = self.blocks[i]
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(j)))
            self._handles.append(block.register_forward_hook(self._post_hook(j)))
            block.weights_arrive_in_call = True  # its weights are only there inside its own call (the hooks)
        self.prepare()
        log.info("block swap (%s): %d of %d blocks through %d slots of %.0f MiB; %.2f GiB of host memory",
                 name, len(self.order), len(self.blocks), self.k, self.slot_bytes / 2**20, self.host_bytes / 2**30)

    def _pack(self, block: nn.Module) -> None:
        """Copy one block's frozen tensors into a host buffer and point them at their slot."""
        j = len(self._refs)
        refs = frozen_refs(block)
        offsets, total = [], 0
        for r in refs:
            offsets.append(total)
            total += _aligned(_nbytes(r.get()))
        host = _HostBuffer(total, self._pin)
        for r, off in zip(refs, offsets):
            _view(host.tensor, off, r.get()).copy_(r.get().detach())
        self._refs.append(refs)
        self._offsets.append(offsets)
        self._host.append(host)
        self.host_bytes += total
        if total > self.slot_bytes or not self._slots:  # the first block, or a larger one: (re)allocate the slots
            self._slots = []
            self._slots = [torch.empty(total, dtype=torch.uint8, device=self.device) for _ in range(self.k)]
            self.slot_bytes = total
            for jj in range(j):
                self._point(jj)
        self._point(j)  # the block's own storage is released here

    def _point(self, j: int) -> None:
        slot = self._slots[j % self.k]
        for r, off in zip(self._refs[j], self._offsets[j]):
            r.set(_view(slot, off, r.get()))

    # ------------------------------------------------------------------ copies
    def _current(self):
        return torch.cuda.current_stream(self.device) if self._stream is not None else None

    def _load(self, j: int) -> None:
        """Copy swapped block j's frozen tensors into its slot (after the slot's last reader)."""
        s = j % self.k
        self._owner[s] = j
        self.copies += 1
        if self._stream is None:
            self._slots[s][:self._host[j].nbytes].copy_(self._host[j].tensor)
            self._loaded[j] = True
            return
        current = self._current()
        free = self._free[s]
        if free is None:  # nothing recorded yet this pass: order after everything enqueued so far
            free = torch.cuda.Event()
            free.record(current)
        self._stream.wait_event(free)
        with torch.cuda.stream(self._stream):
            self._slots[s][:self._host[j].nbytes].copy_(self._host[j].tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._loaded[j] = done

    def _ensure(self, j: int) -> None:
        """Make the compute stream wait until swapped block j's weights are in its slot."""
        if self._owner[j % self.k] != j:
            self._load(j)
        event = self._loaded.pop(j, None)
        if event is not None and event is not True:
            self._current().wait_event(event)

    def _release(self, j: int) -> None:
        """Swapped block j is done with its slot for now (everything that reads it is enqueued)."""
        s = j % self.k
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record(self._current())
            self._free[s] = event

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, j: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if j == 0 and not _in_backward():  # a forward pass starts (not a recomputation in backward)
                self._begin()
            self._ensure(j)
            if torch.is_grad_enabled():
                tensors = [a for a in args if _gated(a)]
                gated = iter(_In.apply(self, j, self.anchor, *tensors))
                return tuple(next(gated) if _gated(a) else a for a in args)
            return None
        return hook

    def _post_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not _in_backward():
                self._release(j)
                nxt = j + self.k
                if nxt < len(self.order):
                    self._load(nxt)  # prefetch into the slot just released
            if torch.is_grad_enabled():
                if _gated(output):
                    return _Out.apply(self, j, output)[0]
                if isinstance(output, tuple) and all(_gated(o) for o in output):
                    return tuple(_Out.apply(self, j, *output))
            return None
        return hook

    def _begin(self) -> None:
        """Start of a forward pass: blocks 0..k-1 must be (or get) into their slots."""
        self._free = [None] * self.k
        for j in range(self.k):
            if self._owner[j] != j:
                self._load(j)

    def _backward_start(self, j: int) -> None:
        self._ensure(j)

    def _backward_done(self, j: int) -> None:
        self._release(j)
        prev = j - self.k
        if prev >= 0:
            self._load(prev)  # prefetch the block backward reaches next in this slot

    # ------------------------------------------------------------------ public
    def prepare(self) -> None:
        """Put swapped blocks 0..k-1 into their slots, as every step expects at its start (call it
        before a replayed CUDA graph when something else, such as sampling, used the model)."""
        self._free = [None] * self.k
        for j in range(self.k):
            if self._owner[j] != j:
                self._load(j)
        for j in range(self.k):
            self._ensure(j)

    @property
    def canonical(self) -> bool:
        return all(self._owner[j] == j for j in range(self.k))

    def remove(self, to: torch.device | str | None = None) -> None:
        """Undo: every swapped tensor becomes an ordinary tensor on `to` (default the device; "cpu": the
        host copies themselves, no copy made)."""
        to = self.device if to is None else torch.device(to)
        for h in self._handles:
            h.remove()
        self._handles = []
        for i in self.order:
            self.blocks[i].__dict__.pop("weights_arrive_in_call", None)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        for refs, offsets, host in zip(self._refs, self._offsets, self._host):
            for r, off in zip(refs, offsets):
                view = _view(host.tensor, off, r.get())
                r.set(view if to.type == "cpu" else view.to(to, copy=True))
            host.close()
        self._refs, self._host, self._slots = [], [], []


class _HostBuffer:
    """A CPU byte buffer of exactly `nbytes`, page-locked for asynchronous copies when `pin` (registered
    with cudaHostRegister: torch's pinned allocator rounds sizes up to a power of two, up to twice the
    memory for a swapped model)."""

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes = nbytes
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self._registered = False
        if pin and nbytes:
            try:
                err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
                self._registered = int(getattr(err, "value", err)) == 0
            except (AttributeError, RuntimeError, TypeError):
                self._registered = False
            if not self._registered:  # fall back to torch's pinned memory
                self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: CUDA may be gone
            self.close()


def swapped_bytes(blocks: Sequence[nn.Module], swap: Iterable[int]) -> int:
    """Bytes of frozen tensors in the blocks at `swap` (what a swapper would keep on the host)."""
    return sum(_aligned(_nbytes(r.get())) for i in swap for r in frozen_refs(blocks[i]))
