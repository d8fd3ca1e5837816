"""The KServe v2 / Triton gRPC surface (``inference.GRPCInferenceService``) over ``Pipeline``.

Subclasses the servicer that ``tritonclient.grpc.service_pb2_grpc`` ships (a second compiled
copy of that proto would clash with tritonclient's in one process); RPCs not overridden here
answer UNIMPLEMENTED from the base class.

Models: each collection is a model (outputs ``SCORES`` FP32 [N, C], the softmax
probabilities over the collection's classes in its class-list order, and ``LABELS`` BYTES
[N, C]); each backbone model of the repository is a model too (output ``EMBEDDINGS`` FP32
[N, dim]). A collection named like a backbone model shadows it. The one input is either
encoded images (BYTES [N] or [N, 1]) or preprocessed pixels (FP32 [N, C, H, W]). Every
model has the single version "1".

Errors raise ``KServeError`` (or the pipeline's own exceptions); ``ErrorInterceptor`` maps
them to statuses. Unknown models follow Triton: NOT_FOUND, "Request for unknown model: 'x'
is not found". In ``ModelStreamInfer`` an error goes into that response's
``error_message`` and the stream continues, as Triton does.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from server import __version__
from server.grpc.interceptors import status_for
from server.pipeline import Pipeline

__all__ = ["KServeError", "KServeServicer", "add_to_server"]

log = logging.getLogger(__name__)

VERSION = "1"
IMAGE_INPUT = "IMAGE"  # BYTES [N] / [N, 1]
PIXELS_INPUT = "PIXELS"  # FP32 [N, C, H, W]
SCORES, LABELS, EMBEDDINGS = "SCORES", "LABELS", "EMBEDDINGS"
PLATFORM = "protoserve"
EXTENSIONS = ("classification", "model_configuration", "statistics")


class KServeError(Exception):
    """The one exception of this surface; ``code`` is the gRPC status name it stands for."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> KServeError:
    return KServeError("INVALID_ARGUMENT", message)


@dataclass
class _Target:
    name: str
    kind: str  # "collection" | "backbone"
    backbone: str


@dataclass
class _Stats:
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inference_count: int = 0
    last_ms: int = 0


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element a 4-byte little-endian length, then the bytes."""
    out, pos, n = [], 0, len(raw)
    while pos < n:
        if pos + 4 > n:
            raise _invalid("BYTES tensor: truncated 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > n:
            raise _invalid(f"BYTES tensor: element of {size} bytes runs past the end")
        out.append(raw[pos : pos + size])
        pos += size
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _unknown(name: str, version: str = "") -> KServeError:
    v = f" version {version}" if version else ""
    return KServeError("NOT_FOUND", f"Request for unknown model: '{name}'{v} is not found")


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._stats: dict[str, _Stats] = {}
        self._stats_lock = threading.Lock()

    # -- models ---------------------------------------------------------------------------------
    def _find(self, name: str, version: str = "") -> _Target | None:
        if version not in ("", VERSION):
            return None
        registry = self.pipeline.registry
        if any(c.name == name for c in registry.collections()):
            return _Target(name, "collection", registry.collection(name).model)
        if name in self.pipeline.models.names():
            return _Target(name, "backbone", name)
        return None

    def _target(self, name: str, version: str = "") -> _Target:
        t = self._find(name, version)
        if t is None:
            raise _unknown(name, version)
        return t

    def _all(self) -> list[_Target]:
        colls = [c.name for c in self.pipeline.registry.collections()]
        names = colls + [m for m in self.pipeline.models.names() if m not in colls]
        return [self._target(n) for n in names]

    def _labels(self, collection: str) -> list[str]:
        return [c.label for c in self.pipeline.registry.list_classes(collection)]

    def _io(self, t: _Target) -> tuple[list[tuple[str, str, list[int]]], ...]:
        """(inputs, outputs) as (name, datatype, shape with -1 for the batch)."""
        m = self.pipeline.model(t.backbone)
        chw = list(m.pre.output_shape)
        inputs = [(IMAGE_INPUT, "BYTES", [-1]), (PIXELS_INPUT, "FP32", [-1, *chw])]
        if t.kind == "collection":
            c = len(self._labels(t.name))
            outputs = [(SCORES, "FP32", [-1, c]), (LABELS, "BYTES", [-1, c])]
        else:
            outputs = [(EMBEDDINGS, "FP32", [-1, int(m.folder.manifest.embedding_dim)])]
        return inputs, outputs

    # -- server ---------------------------------------------------------------------------------
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return kpb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return kpb.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return kpb.ServerMetadataResponse(
            name="protoserve", version=__version__, extensions=list(EXTENSIONS)
        )

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        # Triton answers ready=false (not an error) for a model it does not know.
        return kpb.ModelReadyResponse(ready=self._find(request.name, request.version) is not None)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        t = self._target(request.name, request.version)
        inputs, outputs = self._io(t)
        tm = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=t.name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tm(name=n, datatype=d, shape=s) for n, d, s in inputs],
            outputs=[tm(name=n, datatype=d, shape=s) for n, d, s in outputs],
        )

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        t = self._target(request.name, request.version)
        inputs, outputs = self._io(t)
        types = {"BYTES": mc.TYPE_STRING, "FP32": mc.TYPE_FP32}
        config = mc.ModelConfig(
            name=t.name,
            platform=PLATFORM,
            max_batch_size=self.pipeline.options.max_images_per_request,
            input=[
                mc.ModelInput(
                    name=n,
                    data_type=types[d],
                    dims=s[1:] or [1],
                    reshape=mc.ModelTensorReshape(shape=[]) if not s[1:] else None,
                    optional=True,
                )
                for n, d, s in inputs
            ],
            output=[mc.ModelOutput(name=n, data_type=types[d], dims=s[1:]) for n, d, s in outputs],
        )
        return kpb.ModelConfigResponse(config=config)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        targets = [self._target(request.name, request.version)] if request.name else self._all()
        out = []
        for t in targets:
            with self._stats_lock:
                s = self._stats.get(t.name, _Stats())
                dur = kpb.StatisticDuration
                out.append(
                    kpb.ModelStatistics(
                        name=t.name,
                        version=VERSION,
                        last_inference=s.last_ms,
                        inference_count=s.inference_count,
                        execution_count=s.success,
                        inference_stats=kpb.InferStatistics(
                            success=dur(count=s.success, ns=s.success_ns),
                            fail=dur(count=s.fail, ns=s.fail_ns),
                        ),
                    )
                )
        return kpb.ModelStatisticsResponse(model_stats=out)

    # -- inference ------------------------------------------------------------------------------
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._infer(request)

    def ModelStreamInfer(
        self, request_iterator: Any, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        for request in request_iterator:
            try:
                yield kpb.ModelStreamInferResponse(infer_response=self._infer(request))
            except Exception as e:  # reported in-stream, as Triton does; the stream goes on
                status, message = status_for(e)
                if status is grpc.StatusCode.INTERNAL:
                    log.exception("ModelStreamInfer failed")
                yield kpb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=kpb.ModelInferResponse(
                        model_name=request.model_name, id=request.id
                    ),
                )

    def _infer(self, request: Any) -> Any:
        t = self._target(request.model_name, request.model_version)
        start = time.perf_counter_ns()
        ok, n = False, 0
        try:
            out = self._run(t, request)
            n = int(out.outputs[0].shape[0]) if out.outputs else 0
            ok = True
            return out
        finally:
            ns = time.perf_counter_ns() - start
            with self._stats_lock:
                s = self._stats.setdefault(t.name, _Stats())
                if ok:
                    s.success += 1
                    s.success_ns += ns
                    s.inference_count += n
                    s.last_ms = int(time.time() * 1000)
                else:
                    s.fail += 1
                    s.fail_ns += ns

    def _input(self, request: Any) -> tuple[list[bytes] | None, npt.NDArray[np.float32] | None]:
        if len(request.inputs) != 1:
            raise _invalid(
                f"expected one input ({IMAGE_INPUT} BYTES [N] or {PIXELS_INPUT} FP32 "
                f"[N, C, H, W]), got {len(request.inputs)}"
            )
        inp = request.inputs[0]
        shape = [int(d) for d in inp.shape]
        raw = request.raw_input_contents[0] if request.raw_input_contents else None
        if inp.datatype == "BYTES":
            if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
                raise _invalid(
                    f"input '{inp.name}': BYTES shape must be [N] or [N, 1], not {shape}"
                )
            items = deserialize_bytes(raw) if raw is not None else list(inp.contents.bytes_contents)
            if len(items) != shape[0]:
                raise _invalid(
                    f"input '{inp.name}': shape {shape} but {len(items)} BYTES elements given"
                )
            return items, None
        if inp.datatype == "FP32":
            if len(shape) != 4:
                raise _invalid(f"input '{inp.name}': FP32 pixels must be [N, C, H, W], not {shape}")
            if raw is not None:
                if len(raw) != 4 * int(np.prod(shape)):
                    raise _invalid(
                        f"input '{inp.name}': {len(raw)} bytes for FP32 shape {shape} "
                        f"(needs {4 * int(np.prod(shape))})"
                    )
                arr = np.frombuffer(raw, dtype="<f4")
            else:
                arr = np.asarray(inp.contents.fp32_contents, dtype=np.float32)
                if arr.size != int(np.prod(shape)):
                    raise _invalid(f"input '{inp.name}': {arr.size} values for shape {shape}")
            return None, arr.astype(np.float32).reshape(shape)
        raise _invalid(f"input '{inp.name}': datatype {inp.datatype} (BYTES or FP32 only)")

    def _run(self, t: _Target, request: Any) -> Any:
        images, pixels = self._input(request)
        available: dict[str, tuple[str, Any, list[str] | None]] = {}
        if t.kind == "collection":
            labels = self._labels(t.name)
            results = self.pipeline.classify(
                t.name, images or [], top_k=max(len(labels), 1), pixels=pixels
            )
            col = {label: j for j, label in enumerate(labels)}
            scores = np.zeros((len(results), len(labels)), np.float32)
            for i, r in enumerate(results):
                for p in r.predictions:
                    scores[i, col[p.label]] = p.probability
            lab = np.array([[s.encode() for s in labels]] * len(results), dtype=object).reshape(
                len(results), len(labels)
            )
            available = {SCORES: ("FP32", scores, labels), LABELS: ("BYTES", lab, None)}
        else:
            emb = (
                self.pipeline.embed(images, model=t.backbone).images
                if images is not None
                else self.pipeline.embed_pixels(t.backbone, pixels)  # type: ignore[arg-type]
            )
            available = {EMBEDDINGS: ("FP32", emb, None)}
        wanted = list(request.outputs)
        names = [o.name for o in wanted] or list(available)
        response = kpb.ModelInferResponse(model_name=t.name, model_version=VERSION, id=request.id)
        for i, name in enumerate(names):
            if name not in available:
                raise _invalid(
                    f"unexpected inference output '{name}' for model '{t.name}' "
                    f"(have: {', '.join(available)})"
                )
            datatype, value, class_labels = available[name]
            k = 0
            if wanted and "classification" in wanted[i].parameters:
                k = int(wanted[i].parameters["classification"].int64_param)
            if k > 0:
                if datatype != "FP32":
                    raise _invalid(f"classification requested for non-numeric output '{name}'")
                value = _classification(value, k, class_labels)
                datatype = "BYTES"
            shape = list(value.shape)
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            if datatype == "BYTES":
                response.raw_output_contents.append(serialize_bytes(list(value.reshape(-1))))
            else:
                response.raw_output_contents.append(value.astype("<f4").tobytes())
        return response


def _classification(
    value: npt.NDArray[np.float32], k: int, labels: list[str] | None
) -> npt.NDArray[Any]:
    """Triton's classification extension: the top ``k`` of each row as "score:index[:label]"."""
    k = min(k, value.shape[1])
    out = np.empty((value.shape[0], k), dtype=object)
    for i, row in enumerate(value):
        order = np.argsort(-row, kind="stable")[:k]
        for j, idx in enumerate(order):
            s = f"{float(row[idx]):f}:{int(idx)}"
            if labels is not None:
                s += f":{labels[idx]}"
            out[i, j] = s.encode()
    return out


def add_to_server(pipeline: Pipeline, server: grpc.Server) -> None:
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(pipeline), server)
