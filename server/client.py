"""A typed Python client for the protoserve gRPC API (``docs/api.md``).

Results are plain dataclasses; every failure is one exception type, ``ProtoserveError(code,
message)``, whose ``code`` is the gRPC status name and whose ``message`` is the server's::

    with ProtoserveClient("127.0.0.1:50051") as c:
        c.create_collection("run01", model="omniglot-protonet")
        c.register("run01", "cat", images=["cat1.png", "cat2.png"])
        (result,) = c.classify("run01", ["query.png"], top_k=3)
        print(result.top.label, result.top.probability)

Images are given as encoded bytes or as paths (``str`` / ``os.PathLike``), read here; a path
that cannot be read raises ``ProtoserveError("INVALID_ARGUMENT", ...)`` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.grpc.gen.protoserve.v1 import protoserve_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TARGET",
    "METHODS",
    "METRICS",
    "STRATEGIES",
    "ClassInfo",
    "Collection",
    "Embeddings",
    "ImageInput",
    "ImageResult",
    "Prediction",
    "ProtoserveClient",
    "ProtoserveError",
    "Registered",
    "Suggestion",
    "Suggestions",
]

DEFAULT_TARGET = "127.0.0.1:50051"
ImageInput = bytes | str | os.PathLike[str]

_METHOD_ENUM: dict[str, pb.Method] = {
    "prototype": pb.METHOD_PROTOTYPE,
    "knn": pb.METHOD_KNN,
    "zero-shot": pb.METHOD_ZERO_SHOT,
    "hybrid": pb.METHOD_HYBRID,
}
_METHOD_NAME: dict[int, str] = {v: k for k, v in _METHOD_ENUM.items()}
_METRIC_ENUM: dict[str, pb.Metric] = {"cosine": pb.METRIC_COSINE, "l2": pb.METRIC_L2}
_METRIC_NAME: dict[int, str] = {v: k for k, v in _METRIC_ENUM.items()}
_STRATEGY_ENUM: dict[str, pb.Strategy] = {
    "margin": pb.STRATEGY_MARGIN,
    "entropy": pb.STRATEGY_ENTROPY,
    "least-confidence": pb.STRATEGY_LEAST_CONFIDENCE,
    "diverse": pb.STRATEGY_DIVERSE,
}
STRATEGIES: tuple[str, ...] = tuple(_STRATEGY_ENUM)
METHODS: tuple[str, ...] = tuple(_METHOD_ENUM)
METRICS: tuple[str, ...] = tuple(_METRIC_ENUM)


class ProtoserveError(Exception):
    """Any failed call: ``code`` is the gRPC status name (``"NOT_FOUND"``, ...), ``message``
    the server's message (or, for UNAVAILABLE, one naming the address it could not reach)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Collection:
    name: str
    model: str
    method: str  # prototype | knn | zero-shot | hybrid
    metric: str  # cosine | l2
    threshold: float  # open-set threshold on the top-1 probability (0: never "unknown")
    hybrid_alpha: float
    hybrid_beta: float
    class_count: int
    support_count: int


@dataclass(frozen=True)
class ClassInfo:
    label: str
    image_supports: int
    text_supports: int
    support_ids: tuple[int, ...]


@dataclass(frozen=True)
class Registered:
    class_info: ClassInfo
    added_support_ids: tuple[int, ...]


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # the method's raw score (similarity or negative distance)
    probability: float  # softmax over all classes


@dataclass(frozen=True)
class ImageResult:
    predictions: tuple[Prediction, ...]  # best first
    entropy: float
    margin: float
    unknown: bool
    id: str = ""

    @property
    def top(self) -> Prediction:
        return self.predictions[0]


@dataclass(frozen=True)
class Embeddings:
    images: list[list[float]]
    texts: list[list[float]]
    dim: int


@dataclass(frozen=True)
class Suggestion:
    """An image worth labeling: ``index`` into the images sent, the strategy's ``score``
    (higher = more worth labeling) and the image's current top ``prediction``. With
    ``scores_only`` and ``diverse`` also what ``training.active.select`` needs about it."""

    index: int
    score: float
    prediction: Prediction
    embedding: tuple[float, ...] = ()
    nearest_support: tuple[float, ...] = ()  # empty: no image support registered
    nearest_support_id: int = 0
    probabilities: tuple[float, ...] = ()  # columns: Suggestions.labels


@dataclass(frozen=True)
class Suggestions:
    """``suggest``'s answer: best first (``scores_only``: one per image, in order)."""

    items: list[Suggestion]
    labels: tuple[str, ...] = ()  # scores_only with diverse: the probabilities' classes


# -- conversions --------------------------------------------------------------------------------
def _collection(m: Any) -> Collection:
    return Collection(
        name=m.name,
        model=m.model,
        method=_METHOD_NAME.get(m.method, "unspecified"),
        metric=_METRIC_NAME.get(m.metric, "unspecified"),
        threshold=float(m.open_set_threshold),
        hybrid_alpha=float(m.hybrid_alpha),
        hybrid_beta=float(m.hybrid_beta),
        class_count=int(m.class_count),
        support_count=int(m.support_count),
    )


def _class_info(m: Any) -> ClassInfo:
    return ClassInfo(
        label=m.label,
        image_supports=int(m.image_supports),
        text_supports=int(m.text_supports),
        support_ids=tuple(int(i) for i in m.support_ids),
    )


def _image_result(m: Any) -> ImageResult:
    return ImageResult(
        predictions=tuple(
            Prediction(p.label, float(p.score), float(p.probability)) for p in m.predictions
        ),
        entropy=float(m.entropy),
        margin=float(m.margin),
        unknown=bool(m.unknown),
        id=m.id,
    )


def _suggestion(m: Any) -> Suggestion:
    p = m.prediction
    return Suggestion(
        index=int(m.index),
        score=float(m.score),
        prediction=Prediction(p.label, float(p.score), float(p.probability)),
        embedding=tuple(m.embedding.values),
        nearest_support=tuple(m.nearest_support.values),
        nearest_support_id=int(m.nearest_support_id),
        probabilities=tuple(m.probabilities),
    )


def _strategy(strategy: str) -> pb.Strategy:
    if strategy not in _STRATEGY_ENUM:
        raise ProtoserveError(
            "INVALID_ARGUMENT",
            f"strategy: unknown {strategy!r} (one of {', '.join(STRATEGIES)})",
        )
    return _STRATEGY_ENUM[strategy]


def _method(method: str | None) -> pb.Method:
    if method is None:
        return pb.METHOD_UNSPECIFIED
    if method not in _METHOD_ENUM:
        raise ProtoserveError(
            "INVALID_ARGUMENT", f"unknown method {method!r} (one of {', '.join(METHODS)})"
        )
    return _METHOD_ENUM[method]


def _metric(metric: str | None) -> pb.Metric:
    if metric is None:
        return pb.METRIC_UNSPECIFIED
    if metric not in _METRIC_ENUM:
        raise ProtoserveError(
            "INVALID_ARGUMENT", f"unknown metric {metric!r} (one of {', '.join(METRICS)})"
        )
    return _METRIC_ENUM[metric]


def read_image(image: ImageInput) -> tuple[bytes, str]:
    """(encoded bytes, source): bytes pass through (source ""), paths are read."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image), ""
    path = Path(image)
    try:
        return path.read_bytes(), str(image)
    except OSError as e:
        raise ProtoserveError("INVALID_ARGUMENT", f"cannot read image {path}: {e}") from e


def _options(top_k: int | None, method: str | None, transductive: bool = False) -> Any:
    return pb.ClassifyOptions(top_k=top_k or 0, method=_method(method), transductive=transductive)


class ProtoserveClient:
    """One channel to a protoserve server, on a connection of its own (gRPC would otherwise
    share one connection among channels to the same target, and a multi-process server
    spreads connections, not calls); a context manager (``close`` on exit).

    ``timeout_s`` is the deadline of every unary call (``None``: no deadline); streams
    take their own ``timeout_s`` (default: none).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout_s: float | None = 60.0,
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self._stub = pb_grpc.ProtoserveStub(self._channel)  # type: ignore[no-untyped-call]

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ProtoserveClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _error(self, e: grpc.RpcError) -> ProtoserveError:
        code_fn = getattr(e, "code", None)
        details_fn = getattr(e, "details", None)
        code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
        details = (details_fn() if callable(details_fn) else None) or str(e)
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        if code is grpc.StatusCode.UNAVAILABLE:
            details = f"cannot reach protoserve at {self.target}: {details}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"no answer from protoserve at {self.target} in {self.timeout_s} s: {details}"
        return ProtoserveError(name, details)

    def _call(self, rpc: str, request: Any) -> Any:
        try:
            return getattr(self._stub, rpc)(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._error(e) from None

    # -- collections ----------------------------------------------------------------------------
    def create_collection(
        self,
        name: str,
        model: str,
        *,
        method: str | None = None,
        metric: str | None = None,
        threshold: float | None = None,
        hybrid_alpha: float | None = None,
        hybrid_beta: float | None = None,
    ) -> Collection:
        """A new, empty collection; ``method``/``metric`` default to the model's."""
        coll = pb.Collection(
            name=name,
            model=model,
            method=_method(method),
            metric=_metric(metric),
            open_set_threshold=threshold or 0.0,
            hybrid_alpha=hybrid_alpha or 0.0,
            hybrid_beta=hybrid_beta or 0.0,
        )
        return _collection(
            self._call("CreateCollection", pb.CreateCollectionRequest(collection=coll))
        )

    def get_collection(self, name: str) -> Collection:
        return _collection(self._call("GetCollection", pb.GetCollectionRequest(name=name)))

    def list_collections(self) -> list[Collection]:
        resp = self._call("ListCollections", pb.ListCollectionsRequest())
        return [_collection(c) for c in resp.collections]

    def delete_collection(self, name: str) -> None:
        self._call("DeleteCollection", pb.DeleteCollectionRequest(name=name))

    # -- classes --------------------------------------------------------------------------------
    def register(
        self,
        collection: str,
        label: str,
        images: Iterable[ImageInput] = (),
        texts: Iterable[str] = (),
        *,
        template_set: str = "",
        templates: Sequence[str] = (),
    ) -> Registered:
        """Creates class ``label`` or adds supports to it; returns once they are durable."""
        supports = []
        for image in images:
            data, source = read_image(image)
            supports.append(pb.Support(image=data, source=source))
        supports.extend(pb.Support(text=t) for t in texts)
        resp = self._call(
            "RegisterClass",
            pb.RegisterClassRequest(
                collection=collection,
                label=label,
                supports=supports,
                template_set=template_set,
                templates=list(templates),
            ),
        )
        return Registered(
            _class_info(resp.class_info), tuple(int(i) for i in resp.added_support_ids)
        )

    def remove_support(self, collection: str, label: str, support_id: int) -> ClassInfo:
        resp = self._call(
            "RemoveSupport",
            pb.RemoveSupportRequest(collection=collection, label=label, support_id=support_id),
        )
        return _class_info(resp.class_info)

    def remove_class(self, collection: str, label: str) -> None:
        self._call("RemoveClass", pb.RemoveClassRequest(collection=collection, label=label))

    def get_class(self, collection: str, label: str) -> ClassInfo:
        return _class_info(
            self._call("GetClass", pb.GetClassRequest(collection=collection, label=label))
        )

    def list_classes(self, collection: str) -> list[ClassInfo]:
        resp = self._call("ListClasses", pb.ListClassesRequest(collection=collection))
        return [_class_info(c) for c in resp.classes]

    # -- classification -------------------------------------------------------------------------
    def classify(
        self,
        collection: str,
        images: Iterable[ImageInput],
        *,
        top_k: int | None = None,
        method: str | None = None,
        transductive: bool = False,
    ) -> list[ImageResult]:
        """One result per image, in order (``top_k`` default: the server's, 5).
        ``transductive``: the images of this request refine the prototypes first."""
        data = [read_image(i)[0] for i in images]
        options = _options(top_k, method, transductive)
        resp = self._call(
            "Classify", pb.ClassifyRequest(collection=collection, images=data, options=options)
        )
        return [_image_result(r) for r in resp.results]

    def classify_stream(
        self,
        collection: str,
        images: Iterable[ImageInput | tuple[str, ImageInput]],
        *,
        top_k: int | None = None,
        method: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[ImageResult]:
        """Streams ``images`` (lazily) and yields results in order. Each item is an image or
        ``(id, image)``; ``ImageResult.id`` echoes the id (default: the path, or the index)."""
        options = _options(top_k, method)

        def items() -> Iterator[Any]:
            for i, item in enumerate(images):
                if isinstance(item, tuple):
                    id_, image = item
                    data, _ = read_image(image)
                else:
                    data, source = read_image(item)
                    id_ = source or str(i)
                yield pb.ClassifyItem(collection=collection, image=data, id=id_, options=options)

        try:
            for r in self._stub.ClassifyStream(items(), timeout=timeout_s):
                yield _image_result(r)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def embed(
        self,
        images: Iterable[ImageInput] = (),
        texts: Iterable[str] = (),
        *,
        collection: str = "",
        model: str = "",
        normalize: bool = False,
    ) -> Embeddings:
        """Embeddings from a collection's model (or ``model``)."""
        resp = self._call(
            "Embed",
            pb.EmbedRequest(
                collection=collection,
                model=model,
                images=[read_image(i)[0] for i in images],
                texts=list(texts),
                normalize=normalize,
            ),
        )
        return Embeddings(
            images=[list(e.values) for e in resp.image_embeddings],
            texts=[list(e.values) for e in resp.text_embeddings],
            dim=int(resp.dim),
        )

    # -- label suggestions ----------------------------------------------------------------------
    def suggest(
        self,
        collection: str,
        images: Iterable[ImageInput],
        budget: int,
        *,
        strategy: str = "margin",
        seed: int = 0,
        scores_only: bool = False,
    ) -> Suggestions:
        """The ``budget`` images most worth labeling next, best first (``docs/api.md``,
        "Suggest"); ``scores_only``: every image's score instead, in order."""
        resp = self._call(
            "Suggest",
            pb.SuggestRequest(
                collection=collection,
                images=[read_image(i)[0] for i in images],
                budget=budget,
                strategy=_strategy(strategy),
                seed=seed,
                scores_only=scores_only,
            ),
        )
        return Suggestions([_suggestion(s) for s in resp.suggestions], tuple(resp.labels))
