"""The gRPC front: contract <-> domain conversion (convert), the thin servicer, the error interceptor, the
aio server with health, reflection and graceful drain, and the `difflens serve` / `explain --server` commands.

Only this package imports the generated protobuf modules (through `pb`); importing the package itself is cheap.
"""
