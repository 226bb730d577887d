#!/usr/bin/env bash
# The Triton server's virtual environment, outside the repository: nvidia-pytriton (which ships tritonserver and its
# Python backend), numpy < 2, torch and diffusers, pinned in deploy/triton/requirements.txt.
#
#   deploy/triton/make-venv.sh [PYTHON]      (default python3; DIFFLENS_TRITON_VENV, default
#                                             ~/.cache/difflens/triton-venv, is where it goes)
#
# Idempotent: a venv already made from the same requirements (a stamp named by their hash) costs a stat. Otherwise
# it is made anew in place (its scripts name their interpreter by absolute path), the stamp written last: the tests
# and `difflens triton-serve` look for a stamp, so an interrupted run leaves nothing they would take for a venv.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
req=$here/requirements.txt
venv=${DIFFLENS_TRITON_VENV:-$HOME/.cache/difflens/triton-venv}
python=${1:-python3}
stamp=.installed-$(sha1sum "$req" | cut -c1-12)

[ -e "$venv/$stamp" ] && exit 0

echo "triton-venv: building $venv from $req (a few minutes; nvidia-pytriton is a 55 MB wheel)" >&2
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
"$venv/bin/python" -m pip check
"$venv/bin/python" -c "import numpy, pytriton; assert numpy.__version__.startswith('1.'), numpy.__version__"
touch "$venv/$stamp"
echo "triton-venv: ready: $venv" >&2
