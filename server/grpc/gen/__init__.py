"""Code generated from ``proto/`` by ``python -m server.grpc.gen.generate``; do not edit."""
