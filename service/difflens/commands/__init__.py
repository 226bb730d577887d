"""The `difflens` command line: one module per subcommand (explain and its --server half explain_remote,
make_tiny_model, evaluate, worker, replay, serve, models, ensure_groups, triton_serve, keys, delete), each with
`add(sub)`, which makes its parser and sets its `run`; the flag groups several share (explain_flags, backend_flags,
client_flags, security_flags); and common, the leaf every command may use (the explain request, error lines, the
--server and --out checks, the progress bar). `difflens.cli` only assembles the parsers.

The top layer: nothing else in difflens imports it (tests/test_layering.py). torch, grpc and the queue are imported
only when a command runs, so `difflens --help` is quick and the front's `serve` stays torch-free.
"""
