"""The generated contract modules (`make proto` writes them into difflens/_gen, git-ignored)."""

from __future__ import annotations

try:
    from difflens._gen.difflens.v1 import difflens_pb2 as pb
    from difflens._gen.difflens.v1 import difflens_pb2_grpc as pb_grpc
except ImportError as e:  # a fresh clone before `make setup`
    raise ImportError("the gRPC stubs are missing: run `make proto` (or `make setup`) first") from e

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Explainer"].full_name

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
