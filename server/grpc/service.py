"""The servicer: protobuf <-> ``Pipeline`` calls, nothing else (errors: ``interceptors``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from server import suggest
from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.grpc.gen.protoserve.v1 import protoserve_pb2_grpc as pb_grpc
from server.pipeline import ImageResult, Pipeline, TextSupport
from server.registry import ClassInfo, Collection, InvalidInput
from server.registry.records import Method

__all__ = ["ProtoserveServicer"]

_METHODS: dict[int, Method] = {
    pb.METHOD_PROTOTYPE: "prototype",
    pb.METHOD_KNN: "knn",
    pb.METHOD_ZERO_SHOT: "zero-shot",
    pb.METHOD_HYBRID: "hybrid",
}
_METHOD_ENUM: dict[str, Any] = {v: k for k, v in _METHODS.items()}
_METRICS = {pb.METRIC_COSINE: "cosine", pb.METRIC_L2: "l2"}
_METRIC_ENUM: dict[str, Any] = {v: k for k, v in _METRICS.items()}
_STRATEGIES: dict[int, str] = {
    pb.STRATEGY_UNSPECIFIED: "margin",
    pb.STRATEGY_MARGIN: "margin",
    pb.STRATEGY_ENTROPY: "entropy",
    pb.STRATEGY_LEAST_CONFIDENCE: "least-confidence",
    pb.STRATEGY_DIVERSE: "diverse",
}


def _method(value: int) -> Method | None:
    if value == pb.METHOD_UNSPECIFIED:
        return None
    if value not in _METHODS:
        raise InvalidInput(f"unknown method enum value {value}")
    return _METHODS[value]


def _strategy(value: int) -> str:
    if value not in _STRATEGIES:
        raise InvalidInput(f"strategy: unknown enum value {value}")
    return _STRATEGIES[value]


def _collection(coll: Collection, pipeline: Pipeline) -> Any:
    index = pipeline.registry.index(coll.name)
    return pb.Collection(
        name=coll.name,
        model=coll.model,
        method=_METHOD_ENUM[coll.method],
        metric=_METRIC_ENUM[coll.metric],
        open_set_threshold=coll.threshold or 0.0,
        hybrid_alpha=coll.hybrid_alpha,
        hybrid_beta=coll.hybrid_beta,
        class_count=index.num_classes(),
        support_count=index.num_supports(),
    )


def _class_info(info: ClassInfo, support_ids: list[int]) -> Any:
    return pb.ClassInfo(
        label=info.label,
        image_supports=info.image_supports,
        text_supports=info.text_supports,
        support_ids=support_ids,
    )


def _image_result(r: ImageResult, id_: str = "") -> Any:
    return pb.ImageResult(
        predictions=[
            pb.Prediction(label=p.label, score=p.score, probability=p.probability)
            for p in r.predictions
        ],
        entropy=r.entropy,
        margin=r.margin,
        unknown=r.unknown,
        id=id_,
    )


def _suggestion(s: suggest.Suggestion) -> Any:
    p = s.prediction
    return pb.Suggestion(
        index=s.index,
        score=s.score,
        prediction=pb.Prediction(label=p.label, score=p.score, probability=p.probability),
        embedding=None if s.embedding is None else pb.Embedding(values=s.embedding.tolist()),
        nearest_support=(
            None if s.nearest_support is None else pb.Embedding(values=s.nearest_support.tolist())
        ),
        nearest_support_id=s.nearest_support_id,
        probabilities=[] if s.probabilities is None else s.probabilities.tolist(),
    )


class ProtoserveServicer(pb_grpc.ProtoserveServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def _info(self, collection: str, label: str) -> Any:
        info = self.pipeline.get_class(collection, label)
        ids = [s.id for s in self.pipeline.registry.list_supports(collection, label)]
        return _class_info(info, ids)

    # -- collections ----------------------------------------------------------------------------
    def CreateCollection(self, request: Any, context: grpc.ServicerContext) -> Any:
        c = request.collection
        if c.metric not in (pb.METRIC_UNSPECIFIED, *_METRICS):
            raise InvalidInput(f"unknown metric enum value {c.metric}")
        coll = self.pipeline.create_collection(
            c.name,
            c.model,
            method=_method(c.method),
            metric=_METRICS.get(c.metric),
            threshold=c.open_set_threshold or None,
            hybrid_alpha=c.hybrid_alpha or None,
            hybrid_beta=c.hybrid_beta or None,
        )
        return _collection(coll, self.pipeline)

    def GetCollection(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _collection(self.pipeline.registry.collection(request.name), self.pipeline)

    def ListCollections(self, request: Any, context: grpc.ServicerContext) -> Any:
        colls = self.pipeline.registry.collections()
        return pb.ListCollectionsResponse(
            collections=[_collection(c, self.pipeline) for c in colls]
        )

    def DeleteCollection(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.pipeline.registry.delete_collection(request.name)
        return pb.DeleteCollectionResponse()

    # -- classes --------------------------------------------------------------------------------
    def RegisterClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        templates: str | tuple[str, ...] | None = None
        if request.templates:
            templates = tuple(request.templates)
        elif request.template_set:
            templates = request.template_set
        images = [s.image for s in request.supports if s.WhichOneof("content") == "image"]
        sources = [s.source or None for s in request.supports if s.WhichOneof("content") == "image"]
        texts = [
            TextSupport(s.text, templates)
            for s in request.supports
            if s.WhichOneof("content") == "text"
        ]
        reg = self.pipeline.register(
            request.collection, request.label, images, texts, sources=sources
        )
        return pb.RegisterClassResponse(
            class_info=self._info(request.collection, request.label),
            added_support_ids=[s.id for s in reg.supports],
        )

    def RemoveSupport(self, request: Any, context: grpc.ServicerContext) -> Any:
        sup = self.pipeline.registry.remove_support(request.collection, request.support_id)
        return pb.RemoveSupportResponse(class_info=self._info(request.collection, sup.label))

    def RemoveClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.pipeline.registry.remove_class(request.collection, request.label)
        return pb.RemoveClassResponse()

    def GetClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._info(request.collection, request.label)

    def ListClasses(self, request: Any, context: grpc.ServicerContext) -> Any:
        infos = self.pipeline.registry.list_classes(request.collection)
        return pb.ListClassesResponse(
            classes=[self._info(request.collection, i.label) for i in infos]
        )

    # -- classification -------------------------------------------------------------------------
    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        results = self.pipeline.classify(
            request.collection,
            list(request.images),
            top_k=request.options.top_k,
            method=_method(request.options.method),
            transductive=request.options.transductive,
        )
        return pb.ClassifyResponse(results=[_image_result(r) for r in results])

    def ClassifyStream(self, request_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for item in request_iterator:
            (r,) = self.pipeline.classify(
                item.collection,
                [item.image],
                top_k=item.options.top_k,
                method=_method(item.options.method),
                transductive=item.options.transductive,
            )
            yield _image_result(r, item.id)

    # -- embedding ------------------------------------------------------------------------------
    def Embed(self, request: Any, context: grpc.ServicerContext) -> Any:
        out = self.pipeline.embed(
            list(request.images),
            list(request.texts),
            collection=request.collection,
            model=request.model,
            normalize=request.normalize,
        )
        return pb.EmbedResponse(
            image_embeddings=[pb.Embedding(values=row.tolist()) for row in out.images],
            text_embeddings=[pb.Embedding(values=row.tolist()) for row in out.texts],
            dim=out.dim,
        )

    # -- label suggestions ----------------------------------------------------------------------
    def Suggest(self, request: Any, context: grpc.ServicerContext) -> Any:
        strategy = _strategy(request.strategy)
        images = list(request.images)
        if request.scores_only:
            scored = suggest.score_images(self.pipeline, request.collection, images, strategy)
            return pb.SuggestResponse(
                suggestions=[_suggestion(s) for s in scored.items], labels=scored.labels
            )
        chosen = suggest.suggest(
            self.pipeline,
            request.collection,
            images,
            request.budget,
            strategy,
            seed=request.seed,
        )
        return pb.SuggestResponse(suggestions=[_suggestion(s) for s in chosen])
