"""onnxruntime in-process: the default runtime.

Execution providers come from the config: ``"auto"`` takes TensorRT, then
CUDA, then CPU, as far as the installed onnxruntime build offers them (the
CPU wheel offers only CPU). Thread counts are per session.

Large batches run in slices of ``run_batch`` rows. On the CPU a batch past the caches costs far
more per image: the bundled 27-view Omniglot tower gives 380-395 images/s at batch 1-4, 345 at
32, 208 at 64 and 43 at 128 (with 3 GB resident), so a 128-image Classify or an offline job
ran 9x slower than slices of 8 do. Where only the CPU runs the model, the image tower's slice
is measured when the session loads (``server.runtimes.run_batch``: 1, 2, 4 or 8 rows, the
fastest per row for this model on this many threads) and the text tower's is 8; GPU providers
take the batch whole. An explicit ``run_batch`` is used as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.model_repo import ModelFolder
from server.runtimes.base import (
    Embeddings,
    Pixels,
    Runtime,
    RuntimeError_,
    UnsupportedTower,
    available_cpus,
    check_output,
    check_pixels,
    in_slices,
)
from server.runtimes.run_batch import tune_run_batch

PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass(frozen=True)
class OnnxConfig:
    """How to run the towers. ``providers``: "auto" or an explicit list."""

    providers: tuple[str, ...] | str = "auto"
    intra_op_threads: int = 0  # 0: the CPUs this process may run on
    inter_op_threads: int = 1
    run_batch: int = 0  # rows per session run; 0: measured on the CPU provider alone, else whole

    def __post_init__(self) -> None:
        n = self.run_batch
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"run_batch must be an integer >= 0 (0: automatic), got {n!r}")


CPU_RUN_BATCH = 8  # the text tower's slice on the CPU (the image tower's is measured)

log = logging.getLogger(__name__)


def pick_providers(wanted: tuple[str, ...] | str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if wanted == "auto":
        return [p for p in PREFERRED_PROVIDERS if p in available]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise RuntimeError_(
            f"execution providers {missing} are not available in this onnxruntime build "
            f"(available: {available})"
        )
    return list(wanted)


class OnnxRuntime(Runtime):
    def __init__(
        self,
        model: ModelFolder,
        config: OnnxConfig | None = None,
        towers: Sequence[str] | None = None,
    ) -> None:
        """Loads ``towers`` (default: every tower of the model) into onnxruntime sessions."""
        import onnxruntime as ort

        self.model = model
        self.config = config or OnnxConfig()
        self.dim = model.manifest.embedding_dim
        pre = model.manifest.preprocess
        self._channels = 1 if pre.get("channels") == "L" else 3
        self._size = (int(pre["size"][0]), int(pre["size"][1]))
        opts = ort.SessionOptions()
        # Automatic (0) is counted here: onnxruntime's own default counts the machine's cores,
        # so under taskset or a container's cpuset it would start more threads than CPUs.
        self.intra_op_threads = self.config.intra_op_threads or available_cpus()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.config.inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = pick_providers(self.config.providers)
        cpu_only = self.providers == ["CPUExecutionProvider"]
        self.run_batch = self.config.run_batch or (CPU_RUN_BATCH if cpu_only else 0)
        self._text_run_batch = self.run_batch
        self._sessions: dict[str, Any] = {}
        for tower in model.manifest.towers if towers is None else towers:
            if tower not in model.manifest.towers:
                raise RuntimeError_(f"{model.name} has no {tower!r} tower")
            try:
                self._sessions[tower] = ort.InferenceSession(
                    str(model.tower_path(tower)), sess_options=opts, providers=self.providers
                )
            except Exception as e:  # onnxruntime raises its own exception types
                raise RuntimeError_(f"{model.name}/{tower}: cannot load ONNX tower: {e}") from e
        self._tokenizer: Any = None
        if self.has_text:  # a copy of the image tower alone needs no tokenizer
            from server.tokenizer import ClipTokenizer

            tok = model.manifest.tokenizer
            assert tok is not None and model.vocab_path is not None
            self._tokenizer = ClipTokenizer(model.vocab_path, context_length=tok.context_length)
        if cpu_only and not self.config.run_batch and "image" in self._sessions:
            self.run_batch = self._tune_image_run_batch()

    def _tune_image_run_batch(self) -> int:
        zeros = np.zeros((1, self._channels, *self._size), np.float32)
        best, seconds = tune_run_batch(lambda n: self._run_once("image", zeros.repeat(n, 0)))
        log.info(
            "%s: image tower runs %d row(s) at a time on %s intra-op thread(s) (ms per row: %s)",
            self.model.name,
            best,
            self.intra_op_threads,
            ", ".join(f"{n}: {1000 * s / n:.2f}" for n, s in seconds.items()),
        )
        return best

    @property
    def has_text(self) -> bool:
        return "text" in self._sessions

    def _run(self, tower: str, feed: np.ndarray) -> Embeddings:
        """``feed`` through ``tower``, in slices of at most ``run_batch`` rows (the text
        tower: ``_text_run_batch``)."""
        step = self.run_batch if tower == "image" else self._text_run_batch
        return in_slices(lambda rows: self._run_once(tower, rows), feed, step)

    def _run_once(self, tower: str, feed: np.ndarray) -> Embeddings:
        spec = self.model.manifest.towers[tower]
        try:
            (out,) = self._sessions[tower].run([spec.output], {spec.input: feed})
        except Exception as e:
            raise RuntimeError_(f"{self.model.name}/{tower}: inference failed: {e}") from e
        return check_output(out, feed.shape[0], self.dim, f"{self.model.name}/{tower}")

    def encode_images(self, pixels: Pixels) -> Embeddings:
        batch = check_pixels(pixels, self._channels, self._size)
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._run("image", batch)

    def encode_texts(self, texts: Sequence[str]) -> Embeddings:
        if not self.has_text:
            raise UnsupportedTower(f"model {self.model.name!r} has no text tower")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        tokens = np.ascontiguousarray(self._tokenizer(list(texts)), dtype=np.int64)
        return self._run("text", tokens)
