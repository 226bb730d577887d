#!/usr/bin/env bash
# One shot on a GPU machine: `make bench-gpu` without make or the venv (the image's python3 and its torch, of
# whatever version), installing nothing from the network. Prepare .whl/ first where there is one
# (bench/gpu-wheels.sh), then with the device tool:
#   run(command="bash bench/run-on-gpu.sh", carry=[".whl"], timeout_s=600)
# Arguments go to bench.gpu (e.g. --budget-s 300, --sections batched,cuda_graphs). The JSON files and the log are
# copied to $OUT (the device tool's folder that comes back), else left in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
site=""
if [ -d .whl ]; then
  site=/tmp/difflens-site
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" .whl/*.whl || exit 1
  fi
  [ -e service/difflens/_gen/difflens/v1/difflens_pb2.py ] || { [ -d .whl/gen ] && cp -r .whl/gen service/difflens/_gen; }
  [ -x .whl/bin/redis-server ] && export PATH="$PWD/.whl/bin:$PATH"
fi
export PYTHONPATH="service${site:+:$site}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" bench/results
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/bench-gpu.log"
import shutil, torch
import diffusers, grpc, redis, transformers
print(f"python3 torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}), "
      f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}, "
      f"redis-py {redis.__version__}, redis-server {shutil.which('redis-server')}")
PYEOF
stamp=$(date -u +%Y%m%d-%H%M%S)
"$PY" -m bench.gpu --out "bench/results/gpu-$stamp.json" "$@" 2>&1 | tee -a "$OUT/bench-gpu.log"
rc=${PIPESTATUS[0]}
if [ "$OUT" != bench/results ]; then
  cp bench/results/gpu-"$stamp"*.json "$OUT"/ 2>/dev/null
fi
exit "$rc"
