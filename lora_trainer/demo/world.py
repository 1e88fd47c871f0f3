"""The synthetic world the demo model was pretrained on: one flat shape on a flat background.

Every picture is drawn from a `Scene` (shape, colour, background colour, centre, radius, rotation)
and captioned in the WD14 tag style the rest of the package uses ("red circle, blue background").
The pretraining set draws every shape except `HELD_OUT` (the star): the demo model has never seen
one, so a LoRA trained on star pictures teaches it something it visibly could not draw before.

Rendering is vectorised torch (CPU or GPU): each shape is a polygon that is star-shaped around its
centre, so a pixel's coverage follows from its radius against the outline's radius at its angle,
with one pixel of anti-aliasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "star")
HELD_OUT = "star"  # never shown in pretraining; the demo's LoRA teaches it
SEEN_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10), "orange": (1.00, 0.55, 0.05), "yellow": (0.96, 0.86, 0.12),
    "green": (0.13, 0.62, 0.20), "teal": (0.05, 0.55, 0.55), "blue": (0.10, 0.25, 0.86),
    "purple": (0.52, 0.18, 0.74), "pink": (1.00, 0.52, 0.72), "white": (0.95, 0.95, 0.95),
    "black": (0.07, 0.07, 0.07), "gray": (0.50, 0.50, 0.50), "brown": (0.50, 0.30, 0.12),
}
COLOUR_NAMES = tuple(COLOURS)
_STAR_INNER = 0.45  # inner/outer radius: fatter than a pentagram so it stays a star at 64 px
_CROSS_ARM = 0.36  # half-width of a cross arm, relative to its radius


@dataclass
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre, in [0, 1] of the width/height
    cy: float
    radius: float  # outer radius, as a fraction of the image side
    rotation: float = 0.0  # radians

    def caption(self, *, shape_word: str | None = None) -> str:
        """"red circle, blue background"; `shape_word` replaces the shape's name (a LoRA trigger)."""
        return f"{self.colour} {shape_word or self.shape}, {self.background} background"


def _polygon(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(angles, radii) of the outline's corners, counter-clockwise from angle 0, outer radius 1."""
    def regular(n: int, start: float, radii: list[float]) -> tuple[list[float], list[float]]:
        angles = [start + 2 * math.pi * k / (n * len(radii)) for k in range(n * len(radii))]
        return angles, [radii[k % len(radii)] for k in range(len(angles))]

    up = -math.pi / 2  # image y grows downwards: -pi/2 points to the top
    if shape == "square":
        angles, radii = regular(4, math.pi / 4, [1.0])
    elif shape == "diamond":
        angles, radii = regular(4, 0.0, [1.0])
    elif shape == "triangle":
        angles, radii = regular(3, up, [1.0])
    elif shape == "star":
        angles, radii = regular(5, up, [1.0, _STAR_INNER])
    elif shape == "cross":
        w = _CROSS_ARM
        pts = [(1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1),
               (w, -1), (w, -w)]
        angles = [math.atan2(y, x) for x, y in pts]
        radii = [math.hypot(x, y) for x, y in pts]
        scale = max(radii)
        radii = [r / scale for r in radii]
    else:
        raise ValueError(shape)
    a = torch.tensor(angles, dtype=torch.float64) % (2 * math.pi)
    order = torch.argsort(a)
    return a[order], torch.tensor(radii, dtype=torch.float64)[order]


_POLYGONS = {s: _polygon(s) for s in ("square", "diamond", "triangle", "star", "cross")}


def _outline_radius(shape: str, theta: torch.Tensor) -> torch.Tensor:
    """Radius of the outline (outer radius 1) along the ray at angle `theta` (any shape)."""
    if shape in ("circle", "ring"):
        return torch.ones_like(theta)
    angles, radii = (t.to(theta.device, theta.dtype) for t in _POLYGONS[shape])
    theta = theta % (2 * math.pi)
    n = len(angles)
    # the edge whose angular range holds theta: from corner k to corner k+1 (wrapping)
    k = (torch.searchsorted(angles, theta.contiguous(), right=True) - 1) % n
    a0, r0 = angles[k], radii[k]
    a1, r1 = angles[(k + 1) % n], radii[(k + 1) % n]
    p0 = torch.stack([r0 * torch.cos(a0), r0 * torch.sin(a0)])
    p1 = torch.stack([r1 * torch.cos(a1), r1 * torch.sin(a1)])
    u = torch.stack([torch.cos(theta), torch.sin(theta)])
    d = p1 - p0
    # ray r*u meets the edge p0 + s*(p1 - p0): r = cross(p0, p1) / cross(u, d)
    num = p0[0] * p1[1] - p0[1] * p1[0]
    den = u[0] * d[1] - u[1] * d[0]
    return num / den


@dataclass
class Scenes:
    """A batch of scenes as CPU tensors (indices into SHAPES / COLOUR_NAMES); what `render` draws."""

    shape: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor
    rotation: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)

    def __getitem__(self, i: int) -> Scene:
        return Scene(SHAPES[int(self.shape[i])], COLOUR_NAMES[int(self.colour[i])],
                     COLOUR_NAMES[int(self.background[i])], float(self.cx[i]), float(self.cy[i]),
                     float(self.radius[i]), float(self.rotation[i]))

    def shapes(self) -> list[str]:
        return [SHAPES[int(i)] for i in self.shape]

    def captions(self, *, shape_word: str | None = None) -> list[str]:
        return [self[i].caption(shape_word=shape_word) for i in range(len(self))]

    @classmethod
    def of(cls, scenes: list[Scene]) -> Scenes:
        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype)

        return cls(t([SHAPES.index(s.shape) for s in scenes], torch.long),
                   t([COLOUR_NAMES.index(s.colour) for s in scenes], torch.long),
                   t([COLOUR_NAMES.index(s.background) for s in scenes], torch.long),
                   t([s.cx for s in scenes]), t([s.cy for s in scenes]), t([s.radius for s in scenes]),
                   t([s.rotation for s in scenes]))


def sample_scenes(n: int, generator: torch.Generator, *, shapes: tuple[str, ...] = SEEN_SHAPES,
                  colours: tuple[str, ...] = COLOUR_NAMES, radius: tuple[float, float] = (0.18, 0.38),
                  rotation: float = 0.25) -> Scenes:
    """`n` random scenes: uniform shape and colours (the background's differs from the shape's),
    radius within `radius` (fraction of the side), fully inside the picture, rotated by at most
    `rotation` radians."""
    shape_ids = torch.tensor([SHAPES.index(s) for s in shapes])
    colour_ids = torch.tensor([COLOUR_NAMES.index(c) for c in colours])
    shape = shape_ids[torch.randint(len(shape_ids), (n,), generator=generator)]
    colour = colour_ids[torch.randint(len(colour_ids), (n,), generator=generator)]
    background = torch.randint(len(COLOUR_NAMES) - 1, (n,), generator=generator)
    background = background + (background >= colour).long()  # any colour but the shape's
    u = torch.rand(5, n, generator=generator)
    r = radius[0] + (radius[1] - radius[0]) * u[0]
    cx = r + (1 - 2 * r) * u[1]
    cy = r + (1 - 2 * r) * u[2]
    rot = (u[3] * 2 - 1) * rotation
    return Scenes(shape, colour, background, cx, cy, r, rot)


def random_scenes(n: int, generator: torch.Generator, **kwargs) -> list[Scene]:
    scenes = sample_scenes(n, generator, **kwargs)
    return [scenes[i] for i in range(n)]


_COLOUR_TABLE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])


def render(scenes: Scenes | list[Scene], size: int = 64, *, device: torch.device | str = "cpu",
           jitter: torch.Tensor | None = None) -> torch.Tensor:
    """Pictures of `scenes` as a float tensor (N, 3, size, size) in [0, 1] on `device`.

    `jitter` (N, 2, 3), optional: per-picture offsets added to the shape and background colours."""
    if not isinstance(scenes, Scenes):
        scenes = Scenes.of(list(scenes))
    device = torch.device(device)
    n = len(scenes)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    table = _COLOUR_TABLE.to(device)
    fg, bg = table[scenes.colour.to(device)], table[scenes.background.to(device)]
    if jitter is not None:
        fg = (fg + jitter[:, 0].to(device)).clamp(0, 1)
        bg = (bg + jitter[:, 1].to(device)).clamp(0, 1)
    out = torch.empty(n, 3, size, size, device=device)
    for shape_id in scenes.shape.unique().tolist():
        shape = SHAPES[shape_id]
        idx = (scenes.shape == shape_id).nonzero().flatten()

        def col(t: torch.Tensor, idx: torch.Tensor = idx) -> torch.Tensor:
            return t[idx].to(device).view(-1, 1, 1)

        cx, cy, radius, rot = col(scenes.cx), col(scenes.cy), col(scenes.radius), col(scenes.rotation)
        dx, dy = xs - cx, ys - cy
        rho = torch.sqrt(dx * dx + dy * dy)
        theta = torch.atan2(dy, dx) - rot
        edge = _outline_radius(shape, theta) * radius
        # signed distance to the outline along the ray, in pixels (+ inside): one pixel of anti-aliasing
        cover = ((edge - rho) * size + 0.5).clamp(0, 1)
        if shape == "ring":
            cover = torch.minimum(cover, ((rho - 0.55 * radius) * size + 0.5).clamp(0, 1))
        cover = cover.unsqueeze(1)
        i = idx.to(device)
        out[i] = bg[i].view(-1, 3, 1, 1) * (1 - cover) + fg[i].view(-1, 3, 1, 1) * cover
    return out


def colour_jitter(n: int, generator: torch.Generator, amount: float = 0.05) -> torch.Tensor:
    return (torch.rand(n, 2, 3, generator=generator) * 2 - 1) * amount


def to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) in [0, 1] -> PIL images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
