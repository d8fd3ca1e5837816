"""A Triton python-backend model that runs one ONNX tower with onnxruntime (test servers only).

Triton loads this file as ``<name>/1/model.py``. The model's config.pbtxt names the ONNX file
in ``parameters { key: "onnx_path" ... }`` (absolute, or relative to the model directory)
and may set ``intra_op_threads`` (default 1). The tower's one input and one output are the
config's; all requests of a dynamic batch are concatenated, run once and split again.

Tensors cross the stub by DLPack only: the stub that nvidia-pytriton 0.7.0 ships predates
NumPy 2 (its pybind11 reads the old dtype layout), so ``Tensor.as_numpy()`` returns wrong values
and ``pb_utils.Tensor(name, ndarray)`` sends an empty buffer. ``Tensor.from_dlpack`` renames the
consumed capsule ``used_dlpack`` instead of DLPack's ``used_dltensor``, so NumPy's capsule
destructor reports a harmless "PyCapsule_GetPointer called with incorrect name" as an
unraisable exception; ``_quiet_capsule_errors`` drops exactly that report.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

_CAPSULE_ERROR = "PyCapsule_GetPointer called with incorrect name"


def _quiet_capsule_errors() -> None:
    previous = sys.unraisablehook

    def hook(info: Any) -> None:
        if not (isinstance(info.exc_value, ValueError) and str(info.exc_value) == _CAPSULE_ERROR):
            previous(info)

    sys.unraisablehook = hook


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        _quiet_capsule_errors()

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if "onnx_path" not in params:
            raise pb_utils.TritonModelException("config.pbtxt has no 'onnx_path' parameter")
        path = os.path.join(args["model_repository"], params["onnx_path"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise pb_utils.TritonModelException(f"cannot load {path}: {e}") from e

    def _error(self, message: str) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        arrays: list[np.ndarray] = []
        live: list[int] = []  # indices of the requests in ``arrays``
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses[i] = self._error(f"the request has no input {self.input_name!r}")
            else:
                arrays.append(np.from_dlpack(tensor))
                live.append(i)
        if arrays:
            for i, response in zip(live, self._run(arrays), strict=True):
                responses[i] = response
        assert len(responses) == len(requests) and all(r is not None for r in responses)
        return responses

    def _run(self, arrays: list[np.ndarray]) -> list[Any]:
        sizes = [len(a) for a in arrays]
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: np.concatenate(arrays)})
        except Exception as e:  # onnxruntime has its own exception types
            return [self._error(f"onnxruntime failed: {e}")] * len(arrays)
        if out.ndim < 1 or out.shape[0] != sum(sizes):
            message = f"the model returned {out.shape} for a batch of {sum(sizes)}"
            return [self._error(message)] * len(arrays)
        pieces = np.split(np.asarray(out, dtype=self.output_dtype), np.cumsum(sizes)[:-1])
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor.from_dlpack(self.output_name, np.ascontiguousarray(piece))
                ]
            )
            for piece in pieces
        ]

    def finalize(self) -> None:
        self.session = None
