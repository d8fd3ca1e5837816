"""Backbone runtimes: one small interface, one module per way of running a tower.

* ``onnx_rt``   onnxruntime in-process (the default; CPU, CUDA or TensorRT EPs)
* ``torch_rt``  the torch model itself, for development (needs the ``train`` extra)
* ``triton_rt`` a remote Triton Inference Server through ``tritonclient.grpc``
"""

from server.runtimes.base import Runtime, RuntimeError_, UnsupportedTower

__all__ = ["Runtime", "RuntimeError_", "UnsupportedTower"]
