"""A UNet hosted on a Triton Inference Server: the contract (names, types, shapes), the checked gRPC client a worker
calls instead of its local UNet (`--backend triton`), and `difflens triton-serve`, a pytriton server of a model
folder's UNet for local use and the tests. This package's __init__ and contract import nothing: the server runs in
its own environment (numpy < 2) and imports them there."""
