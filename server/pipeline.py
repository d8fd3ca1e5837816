"""The serving pipeline: decode -> preprocess -> dynamic batcher -> embed -> score -> top-k.

One ``Pipeline`` serves every front end (the gRPC servicer translates protobuf to these calls
and back). Images are decoded and preprocessed on a thread pool; each model's image tower runs
behind its own ``DynamicBatcher``; scores come from the collection's ``CollectionIndex``
(``server.kernels``). Errors are the exceptions of ``server.registry.errors``,
``server.errors`` and ``ImageDecodeError`` (which names the image's index); each carries the
gRPC status it stands for.

Probabilities are a softmax over every class of the collection: of ``logit_scale * score``
for ``prototype`` / ``zero-shot`` / ``hybrid`` (the model's ``scoring.logit_scale``), and the
normalised neighbour votes themselves for ``knn``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from server.batching import BatcherStats, DynamicBatcher
from server.errors import ServingError
from server.imaging import ImageDecodeError, Preprocessor
from server.imaging.decode import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from server.methods import (
    Distribution,
    ImageResult,
    Prediction,
    check_hybrid_metric,
    check_transductive,
    score,
)
from server.model_repo import ModelFolder, ModelRepository
from server.prompts import PromptError, class_embedding
from server.registry import (
    ClassInfo,
    Collection,
    CollectionSpec,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Registration,
    Registry,
    SupportInput,
    image_hash,
)
from server.registry.records import METHODS, Method
from server.runtimes.base import Runtime, available_cpus
from server.runtimes.onnx_rt import OnnxConfig, OnnxRuntime

__all__ = [
    "Distribution",
    "Embeddings",
    "ImageResult",
    "LimitExceeded",
    "Pipeline",
    "PipelineOptions",
    "Prediction",
    "TextSupport",
]

FloatArray = npt.NDArray[np.float32]


class LimitExceeded(ServingError):
    """A configured limit (classes per collection) would be exceeded; the message names it."""

    code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class PipelineOptions:
    max_batch_size: int = 32
    max_delay_s: float = 0.0  # as ServerConfig.max_delay_ms
    max_queue: int = 1024
    decode_threads: int = 4
    model_instances: int = 1  # batches of one model running at once (ServerConfig's; 0: auto)
    max_images_per_request: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    max_classes_per_collection: int = 10_000
    knn_k: int = 10
    default_top_k: int = 5


@dataclass(frozen=True)
class Embeddings:
    """``Pipeline.embed``'s answer: [N, dim] image and [M, dim] text embeddings."""

    images: FloatArray
    texts: FloatArray
    dim: int


@dataclass(frozen=True)
class TextSupport:
    """A text support; ``templates`` (a set name or format strings) ensemble its prompts."""

    text: str
    templates: str | tuple[str, ...] | None = None


class _Model:
    """One loaded model: runtime, preprocessing and the batcher in front of its image tower.

    With several model instances, ``narrow`` is a second copy of the image tower on fewer
    threads (cores / instances): a batch that has the model to itself runs on ``runtime`` and
    every core (a lone client keeps its latency), and batches that run side by side under load
    run on ``narrow``, so that they do not fight over the same cores.
    """

    def __init__(
        self,
        folder: ModelFolder,
        runtime: Runtime,
        opts: PipelineOptions,
        narrow: Runtime | None = None,
        instances: int = 1,
    ) -> None:
        self.folder = folder
        self.runtime = runtime
        self.narrow = narrow
        self.pre = Preprocessor(folder.manifest.preprocess)
        self.logit_scale = float(folder.manifest.scoring.logit_scale)
        self.batcher: DynamicBatcher[FloatArray, FloatArray] = DynamicBatcher(
            self._encode,
            max_batch_size=opts.max_batch_size,
            max_delay_s=opts.max_delay_s,
            max_queue=opts.max_queue,
            name=folder.name,
            instances=instances,
        )

    def _encode(self, items: list[FloatArray]) -> Iterator[FloatArray]:
        """The batch's embeddings, a slice of the runtime's rows per run at a time (its
        ``run_batch``; all at once without one): the batcher answers each slice's callers as
        soon as it is done, so the first callers of a large batch do not wait for the last.
        Each slice runs on every core while it has the model to itself, else on ``narrow``
        (decided per slice: a batch that starts alone does not keep every core once others
        start beside it, where the threads of one run would wait on each other)."""
        i = 0
        while i < len(items):
            runtime = self.runtime
            if self.narrow is not None and self.batcher.load() != (1, 0):
                runtime = self.narrow  # other batches run or wait: share the cores out
            step = runtime.run_batch or len(items)
            yield from runtime.encode_images(np.stack(items[i : i + step]))
            i += step


class Pipeline:
    """What the front ends call. Thread-safe; ``close`` drains the batchers."""

    def __init__(
        self,
        registry: Registry,
        models: ModelRepository,
        options: PipelineOptions | None = None,
        *,
        onnx_config: OnnxConfig | None = None,
    ) -> None:
        self.registry = registry
        self.models = models
        self.options = options or PipelineOptions()
        self._onnx_config = onnx_config
        self._loaded: dict[str, _Model] = {}
        self._load_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.options.decode_threads, thread_name_prefix="decode")
        self._class_lock = threading.Lock()  # the classes-per-collection check and the add

    def close(self) -> None:
        with self._load_lock:
            models = list(self._loaded.values())
        for m in models:
            m.batcher.close(drain=True)
        self._pool.shutdown(wait=True)

    # -- models ---------------------------------------------------------------------------------
    def model(self, name: str) -> _Model:
        with self._load_lock:
            m = self._loaded.get(name)
            if m is None:
                try:
                    folder = self.models.get(name)
                except KeyError as e:
                    raise NotFound(str(e.args[0])) from e
                runtime = OnnxRuntime(folder, self._onnx_config)
                n = self._instances(runtime)
                narrow = self._narrow(folder, n) if n > 1 else None
                m = _Model(folder, runtime, self.options, narrow=narrow, instances=n)
                self._loaded[name] = m
            return m

    def _instances(self, runtime: OnnxRuntime) -> int:
        """The configured model instances; automatic (0): 2 for a model that runs on the CPU
        of a machine with 2 or more cores, else 1."""
        if self.options.model_instances > 0:
            return self.options.model_instances
        on_cpu = runtime.providers == ["CPUExecutionProvider"]
        return 2 if on_cpu and available_cpus() >= 2 else 1

    def _narrow(self, folder: ModelFolder, n: int) -> Runtime:
        """The image tower again, on cores / ``n`` threads, for batches that run side by side."""
        threads = max(1, available_cpus() // n)
        config = replace(self._onnx_config or OnnxConfig(), intra_op_threads=threads)
        return OnnxRuntime(folder, config, towers=("image",))

    def batcher_stats(self) -> list[BatcherStats]:
        """One snapshot per loaded model's batcher (for metrics)."""
        with self._load_lock:
            models = list(self._loaded.values())
        return [m.batcher.stats() for m in models]

    # -- collections ----------------------------------------------------------------------------
    def create_collection(
        self,
        name: str,
        model: str,
        method: Method | None = None,
        metric: str | None = None,
        threshold: float | None = None,
        hybrid_alpha: float | None = None,
        hybrid_beta: float | None = None,
    ) -> Collection:
        m = self.model(model)
        chosen = method or "prototype"
        self._check_method(m, chosen)
        chosen_metric = metric or m.folder.manifest.scoring.metric
        check_hybrid_metric(chosen, chosen_metric)
        spec = CollectionSpec(
            name=name,
            model=model,
            method=chosen,
            metric=chosen_metric,  # type: ignore[arg-type]
            threshold=threshold,
            dim=m.folder.manifest.embedding_dim,
            **{
                k: v
                for k, v in (("hybrid_alpha", hybrid_alpha), ("hybrid_beta", hybrid_beta))
                if v is not None
            },
        )
        return self.registry.create_collection(spec)

    @staticmethod
    def _check_method(m: _Model, method: str) -> None:
        if method not in METHODS:
            raise InvalidInput(f"unknown method {method!r} (have: {', '.join(METHODS)})")
        if method in ("zero-shot", "hybrid") and not m.runtime.has_text:
            raise FailedPrecondition(
                f"method {method!r} needs a text tower; model {m.folder.name!r} has none "
                "(use 'prototype' or 'knn')"
            )

    # -- embedding ------------------------------------------------------------------------------
    def _check_count(self, n: int, what: str = "images") -> None:
        limit = self.options.max_images_per_request
        if n > limit:
            raise InvalidInput(
                f"{n} {what} in one request; the limit is {limit} (max_images_per_request)"
            )

    def embed(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        *,
        collection: str = "",
        model: str = "",
        normalize: bool = False,
    ) -> Embeddings:
        """Image and text embeddings from ``collection``'s model, or from ``model``."""
        if collection and model:
            raise InvalidInput("give a collection or a model, not both")
        if collection:
            model = self.registry.collection(collection).model
        if not model:
            raise InvalidInput("give a collection or a model to embed with")
        m = self.model(model)
        dim = int(m.folder.manifest.embedding_dim)
        if not images and not texts:
            raise InvalidInput("nothing to embed: give images and/or texts")
        self._check_count(len(texts), "texts")
        if texts and not m.runtime.has_text:
            raise FailedPrecondition(
                f"model {m.folder.name!r} has no text tower; it cannot embed texts"
            )
        img = self.embed_images(m, images)
        txt = (
            self.embed_texts(m, [TextSupport(t) for t in texts])
            if texts
            else np.zeros((0, dim), np.float32)
        )
        if normalize:
            img, txt = _unit(img), _unit(txt)
        return Embeddings(img, txt, dim)

    def _preprocess(self, m: _Model, data: bytes, index: int) -> FloatArray:
        try:
            arr = m.pre.preprocess_bytes(
                [data], max_pixels=self.options.max_pixels, max_side=self.options.max_side
            )
        except ImageDecodeError as e:
            msg = str(e).removeprefix("image 0: ")
            raise ImageDecodeError(f"image {index}: {msg}", index=index) from e
        out: FloatArray = arr[0]
        return out

    def embed_images(self, model: str | _Model, images: Sequence[bytes]) -> FloatArray:
        """[N, dim] embeddings: decode (one image in the calling thread, several on the pool),
        then through the model's batcher."""
        m = self.model(model) if isinstance(model, str) else model
        self._check_count(len(images))
        if not images:
            return np.zeros((0, m.folder.manifest.embedding_dim), np.float32)
        if len(images) == 1:  # a pool hand-off would cost more than it overlaps
            pixels = [self._preprocess(m, images[0], 0)]
        else:
            decoded = [self._pool.submit(self._preprocess, m, b, i) for i, b in enumerate(images)]
            pixels = [f.result() for f in decoded]  # the first bad image's error, in order
        done = m.batcher.run_here(pixels)
        if done is not None:  # the model was free: run in this thread, no hand-off
            return np.stack(done).astype(np.float32, copy=False)
        futures: list[Future[FloatArray]] = m.batcher.submit_many(pixels)
        return np.stack([f.result() for f in futures]).astype(np.float32, copy=False)

    def embed_pixels(self, model: str | _Model, pixels: FloatArray) -> FloatArray:
        """[N, dim] embeddings of already preprocessed pixels [N, C, H, W] (no decoding)."""
        m = self.model(model) if isinstance(model, str) else model
        want = m.pre.output_shape
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise InvalidInput(
                f"pixels of shape {list(pixels.shape)}; model {m.folder.name!r} takes "
                f"[N, {', '.join(map(str, want))}]"
            )
        self._check_count(len(pixels))
        if not len(pixels):
            return np.zeros((0, m.folder.manifest.embedding_dim), np.float32)
        rows = [np.ascontiguousarray(p, dtype=np.float32) for p in pixels]
        futures: list[Future[FloatArray]] = m.batcher.submit_many(rows)
        return np.stack([f.result() for f in futures]).astype(np.float32, copy=False)

    def embed_texts(self, model: str | _Model, texts: Sequence[TextSupport]) -> FloatArray:
        m = self.model(model) if isinstance(model, str) else model
        if not m.runtime.has_text:
            raise FailedPrecondition(f"model {m.folder.name!r} has no text tower")
        rows = []
        for t in texts:
            try:
                if t.templates is None:
                    rows.append(m.runtime.encode_texts([t.text])[0])
                else:
                    rows.append(class_embedding(m.runtime, t.text, t.templates))
            except PromptError as e:
                raise InvalidInput(str(e)) from e
        return np.stack(rows).astype(np.float32, copy=False)

    # -- classes --------------------------------------------------------------------------------
    def register(
        self,
        collection: str,
        label: str,
        images: Sequence[bytes] = (),
        texts: Sequence[TextSupport] = (),
        sources: Sequence[str | None] | None = None,
    ) -> Registration:
        """Embeds the supports and adds them to class ``label``; returns once durable."""
        coll = self.registry.collection(collection)
        if not images and not texts:
            raise InvalidInput(f"class {label!r}: give at least one image or text support")
        m = self.model(coll.model)
        self._check_class_limit(collection, label)  # fail fast, before embedding
        srcs = list(sources) if sources is not None else [None] * len(images)
        supports: list[SupportInput] = []
        if images:
            emb = self.embed_images(m, images)
            supports += [
                SupportInput.from_image(e, image_hash(b), s)
                for e, b, s in zip(emb, images, srcs, strict=True)
            ]
        if texts:
            temb = self.embed_texts(m, texts)
            supports += [
                SupportInput.from_text(
                    e, t.text, None if t.templates is None else _template_list(t.templates)
                )
                for e, t in zip(temb, texts, strict=True)
            ]
        with self._class_lock:
            self._check_class_limit(collection, label)
            return self.registry.add_supports(collection, label, supports)

    def _check_class_limit(self, collection: str, label: str) -> None:
        limit = self.options.max_classes_per_collection
        index = self.registry.index(collection)
        if index.num_classes() < limit or label in index.labels().values():
            return
        raise LimitExceeded(
            f"collection {collection!r} has {index.num_classes()} classes; the limit is "
            f"{limit} (max_classes_per_collection), so class {label!r} cannot be added"
        )

    def get_class(self, collection: str, label: str) -> ClassInfo:
        self.registry.collection(collection)
        return self.registry.get_class(collection, label)

    # -- classification -------------------------------------------------------------------------
    def classify(
        self,
        collection: str,
        images: Sequence[bytes],
        top_k: int = 0,
        method: Method | None = None,
        *,
        pixels: FloatArray | None = None,
        transductive: bool = False,
    ) -> list[ImageResult]:
        """Top-k per image; ``pixels`` (already preprocessed [N, C, H, W]) replaces ``images``.
        ``transductive``: the request's images refine the prototypes first
        (``server.transduction``; prototype method only)."""
        self.registry.collection(collection)  # NOT_FOUND before anything else
        k = top_k or self.options.default_top_k
        if k < 1:
            raise InvalidInput(f"top_k must be positive, got {top_k}")
        d = self.distribution(collection, images, method, pixels=pixels, transductive=transductive)
        return [d.result(i, k) for i in range(d.size)]

    def distribution(
        self,
        collection: str,
        images: Sequence[bytes],
        method: Method | None = None,
        *,
        pixels: FloatArray | None = None,
        transductive: bool = False,
    ) -> Distribution:
        """Every class's probability per image, with the embeddings it was computed from."""
        coll = self.registry.collection(collection)
        m = self.model(coll.model)
        chosen: Method = method or coll.method
        self._check_method(m, chosen)
        check_hybrid_metric(chosen, coll.metric)
        check_transductive(chosen, transductive)  # before any image is embedded
        queries = self.embed_images(m, images) if pixels is None else self.embed_pixels(m, pixels)
        if not len(queries):
            empty = np.zeros((0, 0), np.float64)
            return Distribution(coll, (), empty, empty, queries)
        index = self.registry.index(coll.name)
        labels, probs, scores = score(
            coll, index, chosen, queries, m.logit_scale, self.options.knn_k, transductive
        )
        return Distribution(coll, labels, probs, scores, queries)


def _unit(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: FloatArray = (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return out


def _template_list(templates: str | tuple[str, ...]) -> tuple[str, ...]:
    from server.prompts import resolve_templates

    return resolve_templates(templates)
