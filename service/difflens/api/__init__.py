"""The gRPC front: contract <-> domain conversion (convert), the thin servicer, the error interceptor, the
aio server with health, reflection and graceful drain (the `difflens serve` and `explain --server` commands are
commands/serve.py and commands/explain_remote.py).

Only this package imports the generated protobuf modules (through `pb`); importing the package itself is cheap.
"""
