"""A remote Triton Inference Server runs the towers (``tritonclient.grpc``).

Model names on the server: one Triton model per tower, named ``<model>__image`` and
``<model>__text`` (``triton_model_name``), because names must be unique in a Triton
repository that holds several protoserve models. A model folder's ``<tower>/`` directory
is a Triton model directory as it is (its config.pbtxt has no ``name``), so deploying
it means copying or linking ``<model>/image`` to ``<repo>/<model>__image``. Other names
can be passed as ``image_model=`` / ``text_model=``.

What the server must offer for a tower: input ``pixels`` (FP32 or FP16, ``[C, H, W]``) or
``tokens`` (INT64, ``[L]``) and output ``embeddings`` (FP32 or FP16, ``[D]``), as
``server.model_repo.triton_config`` writes them. Construction checks that the server and
both models are ready and that their configs match the manifest; batches larger than a
model's ``max_batch_size`` are sent in several requests. An empty batch returns
``[0, D]`` without a request. A malformed image batch is a ``ValueError`` (as in every
runtime); every other failure raises ``RuntimeError_`` naming the url, the model and
Triton's message. One client is shared by all threads (gRPC channels are
thread-safe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.model_repo import ModelFolder
from server.runtimes.base import (
    OUTPUT,
    Embeddings,
    Pixels,
    Runtime,
    RuntimeError_,
    UnsupportedTower,
    check_output,
    check_pixels,
    in_slices,
)

Tokenizer = Callable[[list[str]], np.ndarray]

# Triton's config data types <-> what goes over the wire.
_WIRE = {"TYPE_FP32": ("FP32", np.float32), "TYPE_FP16": ("FP16", np.float16)}
_TOKENS = {"TYPE_INT64": ("INT64", np.int64)}


def triton_model_name(model: str, tower: str) -> str:
    """The Triton model that serves ``tower`` of protoserve model ``model``."""
    return f"{model}__{tower}"


@dataclass(frozen=True)
class _Tower:
    """One tower's Triton model, as its config describes it."""

    name: str
    input_name: str
    datatype: str  # on the wire: FP32, FP16 or INT64
    dtype: Any  # the numpy type sent
    dims: tuple[int, ...]  # input dims without the batch dimension
    max_batch_size: int  # 0: the model takes any batch in one request


class TritonRuntime(Runtime):
    """Both towers of ``model`` on the Triton server at ``url`` (``host:port``, gRPC)."""

    def __init__(
        self,
        url: str,
        model: ModelFolder,
        *,
        image_model: str | None = None,
        text_model: str | None = None,
        model_version: str = "",
        timeout_s: float = 30.0,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.url = url.removeprefix("grpc://")
        self.model = model
        self.dim = model.manifest.embedding_dim
        self.timeout_s = timeout_s
        self.model_version = model_version
        pre = model.manifest.preprocess
        self._channels = 1 if pre.get("channels") == "L" else 3
        self._size = (int(pre["size"][0]), int(pre["size"][1]))
        try:
            self._client = grpcclient.InferenceServerClient(url=self.url)
        except Exception as e:  # a malformed url fails here
            raise RuntimeError_(f"Triton at {self.url}: cannot create a client: {e}") from e
        try:
            self._check_server()
            names = {"image": image_model, "text": text_model}
            self._towers: dict[str, _Tower] = {}
            for tower in model.manifest.towers:
                name = names[tower] or triton_model_name(model.name, tower)
                self._towers[tower] = self._describe(tower, name)
            self._tokenizer = self._make_tokenizer(tokenizer) if model.has_text else None
        except BaseException:
            self._client.close()
            raise

    # -- construction ---------------------------------------------------------------------

    def _fail(self, what: str, e: InferenceServerException) -> RuntimeError_:
        status = e.status() or "error"
        return RuntimeError_(f"Triton at {self.url}: {what}: {e.message()} ({status})")

    def _check_server(self) -> None:
        try:
            ready = self._client.is_server_ready(client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise self._fail("server not reachable", e) from e
        if not ready:
            raise RuntimeError_(f"Triton at {self.url}: the server is not ready")

    def _describe(self, tower: str, name: str) -> _Tower:
        where = f"model {name!r} ({tower} tower of {self.model.name})"
        try:
            ready = self._client.is_model_ready(
                name, self.model_version, client_timeout=self.timeout_s
            )
            if not ready:
                index = self._client.get_model_repository_index(
                    as_json=True, client_timeout=self.timeout_s
                )
                have = sorted(m["name"] for m in index.get("models", []) if m.get("name"))
                raise RuntimeError_(
                    f"Triton at {self.url}: {where} is not ready or does not exist "
                    f"(models on the server: {', '.join(have) or 'none'})"
                )
            cfg = self._client.get_model_config(
                name, self.model_version, as_json=True, client_timeout=self.timeout_s
            )["config"]
        except InferenceServerException as e:
            raise self._fail(where, e) from e
        spec = self.model.manifest.towers[tower]
        inputs = {i["name"]: i for i in cfg.get("input", [])}
        outputs = {o["name"]: o for o in cfg.get("output", [])}
        if spec.input not in inputs or OUTPUT not in outputs:
            raise RuntimeError_(
                f"Triton at {self.url}: {where} has inputs {sorted(inputs)} and outputs "
                f"{sorted(outputs)}, expected {spec.input!r} -> {OUTPUT!r}"
            )
        inp, out = inputs[spec.input], outputs[OUTPUT]
        types = _WIRE if tower == "image" else _TOKENS
        if inp.get("data_type") not in types or out.get("data_type") not in _WIRE:
            raise RuntimeError_(
                f"Triton at {self.url}: {where} has types {inp.get('data_type')} -> "
                f"{out.get('data_type')}, expected {'/'.join(types)} -> TYPE_FP32/TYPE_FP16"
            )
        max_batch = int(cfg.get("max_batch_size", 0))
        dims = tuple(int(d) for d in inp.get("dims", []))
        out_dims = [int(d) for d in out.get("dims", [])]
        if max_batch == 0:  # no batching dimension in the config: it is part of dims
            dims, out_dims = dims[1:], out_dims[1:]
        if out_dims and out_dims[-1] not in (-1, self.dim):
            raise RuntimeError_(
                f"Triton at {self.url}: {where} returns {out_dims}, the manifest says "
                f"embedding_dim {self.dim}"
            )
        expected = (self._channels, *self._size)
        if tower == "image" and (
            len(dims) != 3 or any(d not in (-1, e) for d, e in zip(dims, expected, strict=True))
        ):
            raise RuntimeError_(
                f"Triton at {self.url}: {where} takes {list(dims)}, the manifest's "
                f"preprocess gives {list(expected)}"
            )
        datatype, dtype = types[inp["data_type"]]
        return _Tower(name, spec.input, datatype, dtype, dims, max_batch)

    def _make_tokenizer(self, tokenizer: Tokenizer | None) -> Tokenizer:
        if tokenizer is not None:
            return tokenizer
        from server.tokenizer import ClipTokenizer

        tok = self.model.manifest.tokenizer
        assert tok is not None and self.model.vocab_path is not None
        return ClipTokenizer(self.model.vocab_path, context_length=tok.context_length)

    # -- inference ------------------------------------------------------------------------

    @property
    def has_text(self) -> bool:
        return "text" in self._towers

    def _infer(self, tower: str, batch: np.ndarray) -> Embeddings:
        t = self._towers[tower]  # max_batch_size 0: the whole batch in one request
        return in_slices(lambda rows: self._infer_once(t, tower, rows), batch, t.max_batch_size)

    def _infer_once(self, t: _Tower, tower: str, chunk: np.ndarray) -> Embeddings:
        what = f"{self.model.name}/{tower} on Triton at {self.url} (model {t.name!r})"
        data = np.ascontiguousarray(chunk, dtype=t.dtype)
        inp = grpcclient.InferInput(t.input_name, list(data.shape), t.datatype)
        inp.set_data_from_numpy(data)
        try:
            result = self._client.infer(
                t.name,
                [inp],
                model_version=self.model_version,
                outputs=[grpcclient.InferRequestedOutput(OUTPUT)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as e:
            raise RuntimeError_(f"{what}: inference failed: {e.message()} ({e.status()})") from e
        out = result.as_numpy(OUTPUT)
        if out is None:
            raise RuntimeError_(f"{what}: the response has no {OUTPUT!r} output")
        if out.dtype not in (np.float32, np.float16):
            raise RuntimeError_(f"{what}: returned {out.dtype}, expected float32")
        return check_output(out, len(chunk), self.dim, what)

    def encode_images(self, pixels: Pixels) -> Embeddings:
        batch = check_pixels(pixels, self._channels, self._size)
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._infer("image", batch)

    def encode_texts(self, texts: Sequence[str]) -> Embeddings:
        if self._tokenizer is None:
            raise UnsupportedTower(f"model {self.model.name!r} has no text tower")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        tokens = np.asarray(self._tokenizer(list(texts)))
        length = self._towers["text"].dims
        if tokens.ndim != 2 or (length and length[-1] not in (-1, tokens.shape[1])):
            raise RuntimeError_(
                f"{self.model.name}/text: the tokenizer gave {tokens.shape}, Triton model "
                f"{self._towers['text'].name!r} takes [N, {', '.join(map(str, length))}]"
            )
        return self._infer("text", tokens)

    def close(self) -> None:
        self._client.close()
