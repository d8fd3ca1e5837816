"""protoserve: zero-shot and few-shot image classification over gRPC."""

__version__ = "0.1.0"
