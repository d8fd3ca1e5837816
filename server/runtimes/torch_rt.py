"""The torch model itself, for development (needs the ``train`` extra).

Rebuilds an open_clip model from a model folder's provenance (architecture
plus pretrained tag or local checkpoint), or wraps any image/text callables
(our own backbones). Preprocessing and tokenization are the same as the
other runtimes', so the three can be compared on one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from server.model_repo import ModelFolder
from server.runtimes.base import Embeddings, Pixels, Runtime, RuntimeError_, UnsupportedTower


class TorchRuntime(Runtime):
    def __init__(
        self,
        dim: int,
        image_fn: Callable[[Any], Any],
        text_fn: Callable[[Any], Any] | None = None,
        tokenizer: Callable[[list[str]], np.ndarray] | None = None,
        device: str = "cpu",
    ) -> None:
        import torch

        self.dim = dim
        self._torch = torch
        self._image = image_fn
        self._text = text_fn
        self._tokenizer = tokenizer
        self.device = device

    @classmethod
    def from_model_folder(cls, model: ModelFolder, device: str = "cpu") -> TorchRuntime:
        prov = model.manifest.provenance
        if prov.source != "open_clip":
            raise RuntimeError_(
                f"{model.name}: the torch runtime rebuilds open_clip models only; "
                "wrap our own backbones with TorchRuntime(dim, image_fn)"
            )
        if prov.pretrained is None and prov.checkpoint is None:
            raise RuntimeError_(
                f"{model.name}: exported from randomly initialised weights; the torch "
                "runtime needs a pretrained tag or checkpoint to rebuild them"
            )
        import open_clip

        net, _, _ = open_clip.create_model_and_transforms(
            prov.architecture, pretrained=prov.pretrained
        )
        if prov.checkpoint is not None:
            open_clip.load_checkpoint(net, prov.checkpoint)
        net = net.eval().to(device)
        tokenizer = None
        if model.has_text:
            from server.tokenizer import ClipTokenizer

            tok = model.manifest.tokenizer
            assert tok is not None and model.vocab_path is not None
            tokenizer = ClipTokenizer(model.vocab_path, context_length=tok.context_length)
        return cls(
            model.manifest.embedding_dim,
            lambda x: net.encode_image(x, normalize=False),
            lambda t: net.encode_text(t, normalize=False),
            tokenizer,
            device,
        )

    @property
    def has_text(self) -> bool:
        return self._text is not None and self._tokenizer is not None

    def _run(self, fn: Callable[[Any], Any], batch: np.ndarray) -> Embeddings:
        torch = self._torch
        with torch.inference_mode():
            out = fn(torch.from_numpy(batch).to(self.device))
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def encode_images(self, pixels: Pixels) -> Embeddings:
        batch = np.ascontiguousarray(pixels, dtype=np.float32)
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._run(self._image, batch)

    def encode_texts(self, texts: Sequence[str]) -> Embeddings:
        if not self.has_text:
            raise UnsupportedTower("this torch runtime has no text tower")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        assert self._tokenizer is not None and self._text is not None
        tokens = np.ascontiguousarray(self._tokenizer(list(texts)), dtype=np.int64)
        return self._run(self._text, tokens)
