"""The gRPC surface: generated code (``gen``), the servicer, the interceptor and the server."""
