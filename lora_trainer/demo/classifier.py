"""A small shape classifier trained on the synthetic world, used to *measure* what a model draws.

It sees every shape (the held-out star too) in every colour, with blur, noise and colour jitter so
that generated pictures (softer edges, slight colour drift) are read as well as rendered ones. The
tests and `bench/demo_learning.py` use it to count how many generations show the star with and
without a LoRA. Trains in about half a minute on one CPU core.
"""

from __future__ import annotations

import torch
from torch import nn

from .world import SHAPES, colour_jitter, render, sample_scenes


class ShapeClassifier(nn.Module):
    def __init__(self, classes: tuple[str, ...] = SHAPES, width: int = 16):
        super().__init__()
        self.classes = tuple(classes)
        w = width
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(4 * w, len(self.classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] -> logits (N, classes)."""
        x = self.features(images * 2 - 1)
        return self.head(x.mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        self.eval()
        return [self.classes[int(i)] for i in self(images).argmax(dim=1)]

    def fraction(self, images: torch.Tensor, shape: str) -> float:
        """Share of `images` classified as `shape`."""
        labels = self.predict(images)
        return sum(label == shape for label in labels) / max(1, len(labels))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, device = images.shape[0], images.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    # soften most edges a little: generated pictures are less crisp than rendered ones
    strength = rand(n, 1, 1, 1) * (rand(n, 1, 1, 1) < 0.6)
    blurred = nn.functional.avg_pool2d(nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = images * (1 - strength) + blurred * strength
    noise = torch.randn(images.shape, generator=generator).to(device) * 0.04 * rand(n, 1, 1, 1)
    return (images + noise).clamp(0, 1)


def train_classifier(*, steps: int = 200, batch: int = 64, size: int = 64, seed: int = 0, lr: float = 3e-3,
                     width: int = 16, device: torch.device | str = "cpu") -> ShapeClassifier:
    """Train on freshly rendered pictures of every shape (about 25 s of one CPU core at the defaults)."""
    g = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)  # the layers' initialisation, without moving the caller's random stream
    model = ShapeClassifier(width=width)
    torch.set_rng_state(torch_state)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        scenes = sample_scenes(batch, g, shapes=model.classes)
        images = _augment(render(scenes, size, device=device, jitter=colour_jitter(batch, g, 0.08)), g)
        loss = nn.functional.cross_entropy(model(images), scenes.shape.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: ShapeClassifier, *, n: int = 512, size: int = 64, seed: int = 1) -> float:
    """Share of freshly rendered pictures (every shape) the classifier names right."""
    g = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(n, g, shapes=model.classes)
    device = next(model.parameters()).device
    labels = model.predict(render(scenes, size, device=device, jitter=colour_jitter(n, g)))
    return sum(lab == shape for lab, shape in zip(labels, scenes.shapes())) / n


def cached_classifier(path, *, steps: int = 300, batch: int = 64) -> ShapeClassifier:
    """The classifier saved at `path` (a state dict), trained and saved there first when missing: the benchmarks
    that read many LoRAs share one."""
    from pathlib import Path

    path = Path(path)
    clf = ShapeClassifier()
    if path.exists():
        clf.load_state_dict(torch.load(path))
    else:
        clf = train_classifier(steps=steps, batch=batch)
        torch.save(clf.state_dict(), path)
    return clf.eval()
