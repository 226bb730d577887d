#!/bin/sh
# The gRPC stubs, for `make proto` (the Makefile's $(GEN) rule runs this) and the image builds (which have no make):
#   deploy/docker/gen-stubs.sh PYTHON OUT_DIR      (run from the repository root; PYTHON has grpcio-tools)
set -eu
python=$1
out=$2
rm -rf "$out" && mkdir -p "$out"
"$python" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/difflens/v1/difflens.proto
# The generated grpc module says `from difflens.v1 import ...`, which would resolve inside our own package:
# rewrite it to the stubs' real location.
sed -i 's/^from difflens\.v1 import/from difflens._gen.difflens.v1 import/' "$out/difflens/v1/difflens_pb2_grpc.py"
touch "$out/__init__.py" "$out/difflens/__init__.py" "$out/difflens/v1/__init__.py"
