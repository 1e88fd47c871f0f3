"""A loaded WD14 tagger: labels + onnxruntime session + reference preprocessing, batched."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import TaggerError
from .labels import Labels, load_labels
from .preprocess import prepare_image
from .registry import ModelFiles, resolve_model
from .session import GraphInfo, graph_info, open_session

log = logging.getLogger(__name__)


class Tagger:
    """Scores images with a WD14 tagger. `provider` says which onnxruntime provider runs it."""

    def __init__(self, files: ModelFiles, provider: str = "auto"):
        self.files = files
        self.labels: Labels = load_labels(files.tags)
        self.session, self.provider = open_session(files.model, provider)
        self.info: GraphInfo = graph_info(self.session)
        if self.info.outputs is not None and self.info.outputs != len(self.labels):
            raise TaggerError(f"{files.model.name} gives {self.info.outputs} scores but {files.tags.name} lists "
                              f"{len(self.labels)} tags; use the two files of the same tagger.")

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
             provider: str = "auto", **resolve_kwargs: object) -> Tagger:
        """Resolve (download if needed) and load a tagger by short name, repo id or folder."""
        return cls(resolve_model(model, cache_dir, **resolve_kwargs), provider)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        return self.info.size

    def batch_size(self, requested: int) -> int:
        """The batch to use: what was asked, or the export's fixed batch (old v2 taggers: 1)."""
        if self.info.batch is not None and requested != self.info.batch:
            log.info("this tagger was exported with a fixed batch of %d; using it", self.info.batch)
            return self.info.batch
        return max(1, requested)

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([prepare_image(img, self.size) for img in images]) if images else \
            np.zeros((0, self.size, self.size, 3), np.float32)

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Scores (N, tags) for a preprocessed NHWC batch; respects a fixed-batch export."""
        fixed = self.info.batch
        if fixed is None or len(batch) == fixed:
            return self._run(batch)
        out = []
        for start in range(0, len(batch), fixed):
            chunk = batch[start:start + fixed]
            if len(chunk) < fixed:  # a fixed-batch graph takes exactly `fixed` images: pad, then drop
                pad = np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)
                out.append(self._run(np.concatenate([chunk, pad]))[:len(chunk)])
            else:
                out.append(self._run(chunk))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Scores (N, tags) for RGB images from `dataset.images.load_image`."""
        return self.predict_arrays(self.prepare(images))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        outputs = self.session.run([self.info.output_name],  # type: ignore[attr-defined]
                                   {self.info.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(outputs[0], dtype=np.float32).reshape(len(batch), -1)
