"""Block swap (accel/swap.py) on the CPU: the same numbers with and without swapping, in every mode.

On the CPU the copies are synchronous, but the schedule (which block is in which slot when, what the
backward pass reloads, how checkpointed recomputation interleaves) is the one the GPU runs; a block
that read another block's weights would change the losses and gradients below.
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_trainer.accel.swap import BlockSwapper, frozen_refs, spread, swapped_bytes


class Block(nn.Module):
    """Two streams in and out (like Flux's double blocks), a frozen buffer, a trainable low-rank part."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(dim, 2 * dim)
        self.b = nn.Linear(2 * dim, dim)
        self.mod = nn.Linear(dim, dim)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
            p.requires_grad_(False)
        self.register_buffer("gain", torch.rand(dim, generator=g) + 0.5)
        self.down = nn.Parameter(torch.randn(2, dim, generator=g) * 0.1)
        self.up = nn.Parameter(torch.randn(dim, 2, generator=g) * 0.1)

    def forward(self, x, y, vec):
        h = self.b(torch.nn.functional.gelu(self.a(x))) * self.gain
        h = h + (x @ self.down.t()) @ self.up.t()
        return x + h * torch.sigmoid(self.mod(vec)), y + 0.5 * h.mean(dim=-1, keepdim=True)


class Model(nn.Module):
    def __init__(self, n: int = 6, dim: int = 8, checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, i) for i in range(n))
        self.checkpointing = checkpointing

    def forward(self, x, y, vec):
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x, y = checkpoint(block, x, y, vec, use_reentrant=False)
            else:
                x, y = block(x, y, vec)
        return x, y


def _train(model: Model, steps: int = 3, seed: int = 0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    losses, grads = [], []
    for _ in range(steps):
        x, y, vec = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 1, generator=g), torch.randn(3, 1, 8, generator=g)
        out, side = model(x, y, vec)  # inputs need no grad: the first block's backward only feeds LoRA grads
        loss = (out ** 2).mean() + side.mean()
        loss.backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("swap, slots", [([0, 1, 2, 3, 4, 5], 2), ([1, 3, 5], 2), ([0, 2, 3, 5], 1), ([0, 1, 4, 5], 3)])
def test_swapped_training_equals_unswapped(checkpointing, swap, slots):
    ref = Model(checkpointing=checkpointing)
    model = copy.deepcopy(ref)
    ref_losses, ref_grads = _train(ref)
    swapper = BlockSwapper(model.blocks, swap, "cpu", slots=slots)
    losses, grads = _train(model)
    assert losses == ref_losses
    for a, b in zip(grads, ref_grads):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # steady state: every step loads each swapped block beyond the first `slots` once in forward and
    # once in backward; the first `slots` stay in place from one step to the next
    before = swapper.copies
    _train(model, steps=1)
    k = min(slots, len(swap))
    assert swapper.copies - before == 2 * (len(swap) - k)
    assert swapper.canonical


def test_blocks_share_slot_memory_and_remove_restores_them():
    model = Model()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    swapper = BlockSwapper(model.blocks, [0, 2, 4, 5], "cpu", slots=2)
    ptr = lambda i: model.blocks[i].a.weight.data_ptr()
    assert ptr(0) == ptr(4) and ptr(2) == ptr(5) and ptr(0) != ptr(2) and ptr(1) not in (ptr(0), ptr(2))
    assert model.blocks[1].a.weight.data_ptr() == ptr(1)  # resident blocks are untouched
    assert swapper.slot_bytes >= swapped_bytes(model.blocks, [0]) and swapper.host_bytes == swapped_bytes(
        model.blocks, [0, 2, 4, 5])
    # trainable tensors never move
    assert all(r.get().requires_grad is False for r in frozen_refs(model.blocks[0]))
    assert model.blocks[4].down.data_ptr() != model.blocks[0].down.data_ptr()
    with torch.no_grad():  # a forward-only pass (sampling) leaves other blocks in the slots...
        model(torch.randn(2, 5, 8), torch.randn(2, 5, 1), torch.randn(2, 1, 8))
    assert not swapper.canonical
    swapper.prepare()  # ...until prepare() puts the first ones back
    assert swapper.canonical
    swapper.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, originals[k]), k
    assert model.blocks[0].a.weight.data_ptr() != model.blocks[4].a.weight.data_ptr()


def test_no_grad_forward_matches_and_mixed_passes():
    ref = Model()
    model = copy.deepcopy(ref)
    BlockSwapper(model.blocks, spread(6, 4), "cpu", slots=2)
    x, y, vec = torch.randn(2, 5, 8), torch.randn(2, 5, 1), torch.randn(2, 1, 8)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, y, vec), ref(x, y, vec)))
    # a forward with grad that never runs backward (validation), then training: still exact
    model(x, y, vec)
    ref(x, y, vec)
    assert _train(model)[0] == _train(ref)[0]


def test_quantised_and_fp8_layers_swap_their_stored_tensors():
    quant = pytest.importorskip("lora_trainer.quant")
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    ref = Model(n=4)
    for block in ref.blocks:
        quant.quantize_linears(block, lambda name, layer: quant.Fp8Weight.quantize(layer.weight, per_row=True))
    model = copy.deepcopy(ref)
    swapper = BlockSwapper(model.blocks, [0, 1, 2, 3], "cpu", slots=2)
    names = {r.name for r in frozen_refs(model.blocks[0])}
    assert {"data", "scale", "gain"} <= names
    assert _train(model)[0] == _train(ref)[0]
    assert swapper.copies > 0


def test_spread():
    assert spread(19, 0) == []
    assert spread(4, 9) == [0, 1, 2, 3]
    picked = spread(19, 8)
    assert len(picked) == 8 and picked == sorted(picked) and max(b - a for a, b in itertools.pairwise(picked)) <= 3
    assert spread(38, 16)[0] >= 1  # the first block stays resident where there is room


def test_checkpoint_function_that_is_reentrant_still_loads_before_recompute():
    ref = Model(n=4)
    model = copy.deepcopy(ref)
    BlockSwapper(model.blocks, [0, 1, 2, 3], "cpu", slots=1)

    def run(m):
        x, y, vec = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 1), torch.randn(2, 1, 8)
        torch.manual_seed(0)
        for block in m.blocks:
            x, y = checkpoint(functools.partial(block), x, y, vec, use_reentrant=True)
        loss = (x ** 2).mean()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    torch.manual_seed(1)
    a = run(ref)
    torch.manual_seed(1)
    b = run(model)
    assert a[0] == b[0] and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))
