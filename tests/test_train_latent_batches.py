"""Latent caching encodes consecutive images of one size in one VAE call: the same latents (and mirror
latents) as one image per call, within float rounding, with the same noise drawn in the same order."""

from __future__ import annotations

import copy

import torch
from train_support import make_dataset, tiny_config

from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.train.cache import cache_latents, call_pixels
from lora_trainer.train.planning import prepare_dataset

# 64x64, 64x96 (another bucket) interleaved: runs of one size are 2, 1, 3 images long
SIZES = [(64, 64), (64, 64), (64, 96), (64, 64), (64, 64), (64, 64)]


def _dataset(tmp_path):
    data = make_dataset(tmp_path / "d", n=len(SIZES), sizes=SIZES)
    dataset, _ = prepare_dataset(tiny_config(data, tmp_path / "o"))
    assert len({tuple(i.choice.bucket) for i in dataset.items}) == 2
    return dataset


def _spy(vae) -> list[int]:
    calls: list[int] = []
    encode = vae.encode
    vae.encode = lambda x: (calls.append(x.shape[0]), encode(x))[1]
    return calls


def _close(a, b) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.latent, y.latent, atol=1e-5, rtol=1e-5)
        assert (x.flipped is None) == (y.flipped is None)
        if x.flipped is not None:
            torch.testing.assert_close(x.flipped, y.flipped, atol=1e-5, rtol=1e-5)


def test_batched_latents_equal_one_image_per_call(tmp_path):
    dataset = _dataset(tmp_path)
    vae = build_tiny_bundle("sd1").vae
    assert call_pixels(vae) == 0  # the CPU: one image per call unless asked
    calls = _spy(vae)
    for flip in (False, True):
        calls.clear()
        single = cache_latents(dataset, vae, 0.18, flip=flip, seed=3)
        assert calls == [1] * len(SIZES) * (2 if flip else 1)
        calls.clear()
        progress: list[tuple[int, int]] = []
        batched = cache_latents(dataset, vae, 0.18, flip=flip, seed=3, batch_pixels=64 * 96 * 8,
                                progress=lambda done, total, seen=progress: seen.append((done, total)))
        assert calls == ([4, 2, 6] if flip else [2, 1, 3])  # a call per run of one size, mirrors beside
        assert progress[-1] == (len(SIZES), len(SIZES)) and [d for d, _ in progress] == sorted(d for d, _ in progress)
        _close(batched, single)
        assert not torch.equal(batched[0].latent, batched[1].latent)  # each image its own noise
        calls.clear()
        small = cache_latents(dataset, vae, 0.18, flip=flip, seed=3, batch_pixels=64 * 64 * 2)
        assert max(calls) <= 2  # the budget splits runs (an image and its mirror, or two images)
        _close(small, single)


def test_batches_around_latents_already_on_disk(tmp_path):
    dataset = _dataset(tmp_path)
    vae = build_tiny_bundle("sd1").vae
    calls = _spy(vae)
    cache = tmp_path / "cache"
    part = type(dataset)([dataset.items[i] for i in (1, 4)], dataset.img_root, None, [])
    cache_latents(part, vae, 0.18, flip=False, seed=3, disk_dir=cache)  # two of them on disk already
    calls.clear()
    mixed = cache_latents(dataset, vae, 0.18, flip=False, seed=3, disk_dir=cache, batch_pixels=1 << 20)
    assert calls == [1, 1, 2] and len(list(cache.iterdir())) == len(SIZES)
    # on disk: the latents of the first call (other noise); the rest as one-image calls of these 4 images
    alone = cache_latents(type(dataset)([dataset.items[i] for i in (0, 2, 3, 5)], dataset.img_root, None, []),
                          vae, 0.18, flip=False, seed=3)
    _close([mixed[i] for i in (0, 2, 3, 5)], alone)
    calls.clear()
    again = cache_latents(dataset, vae, 0.18, flip=False, seed=3, disk_dir=cache, batch_pixels=1 << 20)
    assert calls == [] and all(torch.equal(a.latent, b.latent) for a, b in zip(again, mixed))


def test_a_batch_redoes_only_its_overflowing_images_in_fp32(tmp_path):
    dataset = _dataset(tmp_path)
    vae = build_tiny_bundle("sd1").vae.to(torch.bfloat16).float()  # fp32 holding bf16's values
    reference = cache_latents(dataset, vae, 0.18, flip=False, seed=3)  # fp32, one per call
    half = copy.deepcopy(vae).to(torch.bfloat16)

    def overflowing(module, inputs, output):  # the second image of every bf16 batch overflows (SDXL's VAE in fp16 may)
        if output.dtype == torch.bfloat16 and output.shape[0] > 1:
            output = output.clone()
            output[1] = float("inf")
        return output
    half.encoder.register_forward_hook(overflowing)  # a deep copy (the fp32 redo) keeps it: fp32 is untouched
    batched = cache_latents(dataset, half, 0.18, flip=False, seed=3, batch_pixels=1 << 20)
    assert all(torch.isfinite(b.latent).all() for b in batched)
    for k in (1, 4):  # second of the runs [0, 1] and [3, 4, 5]: redone in fp32, the same noise
        torch.testing.assert_close(batched[k].latent, reference[k].latent, atol=1e-5, rtol=1e-5)
    for k in (0, 3, 5):  # the rest stay bf16 encodes (close, not equal)
        torch.testing.assert_close(batched[k].latent, reference[k].latent, atol=0.1, rtol=0.1)
