"""`difflens triton-serve`: a model folder's UNet on a local Triton server, for trying the triton backend out and
for the tests. The server needs numpy < 2 and nvidia-pytriton, which the project's environment does not have, so
the command runs triton/server.py with the Triton environment's Python (deploy/triton/make-venv.sh builds it)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from difflens.errors import InvalidArgument

DEFAULT_VENV = Path.home() / ".cache" / "difflens" / "triton-venv"
# Run by the Triton environment's Python: this package is found after that environment's own packages (its numpy
# must win), from the folder that holds it here (argv[1]).
BOOT = ("import runpy, sys; sys.path.append(sys.argv.pop(1)); "
        "runpy.run_module('difflens.triton.server', run_name='__main__', alter_sys=True)")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton-serve", help="serve a model folder's UNet on a local Triton server (--backend triton)",
                       description="Serve MODEL_DIR's UNet with nvidia-pytriton (tritonserver with the Python "
                                   "backend; dynamic batching on) as the Triton model `--backend triton` calls: "
                                   "inputs sample, timestep, encoder_hidden_states, output noise_pred. For local use "
                                   "and tests; a production deployment runs its own Triton with a model repository "
                                   "of the same contract. Runs in the Triton environment (numpy < 2), made by "
                                   "`make triton-venv`. Ready when --port-file is written; SIGTERM stops it cleanly.")
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="local diffusers folder with unet/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001; 0: any free port)")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus metrics port, Triton's nv_inference_* (default 8002; 0: any free port)")
    p.add_argument("--model-name", metavar="NAME", help="the Triton model's name (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=64, help="max_batch_size: samples per call (default 64)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="the UNet's dtype (default "
                                                                                        "float32)")
    p.add_argument("--device", metavar="cpu|cuda|cuda:N", help="where the UNet runs (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--port-file", type=Path, metavar="PATH",
                   help='once serving, write {"port": N, "metrics_port": M} here')
    p.add_argument("--venv", type=Path, metavar="DIR", help="the Triton environment (default: DIFFLENS_TRITON_VENV, "
                                                            f"else {DEFAULT_VENV})")
    p.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    if not (args.model_dir / "unet" / "config.json").is_file():
        raise InvalidArgument("MODEL_DIR", f"{args.model_dir} has no unet/config.json")
    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if not 0 <= port < 65536:
            raise InvalidArgument(flag, f"got {port}; allowed 0..65535 (0 = any free port)")
    if args.max_batch < 1:
        raise InvalidArgument("--max-batch", f"got {args.max_batch}; must be >= 1")
    if args.threads < 0:
        raise InvalidArgument("--threads", f"got {args.threads}; must be >= 0")
    if args.model_name is not None and not all(c.isalnum() or c in "._-" for c in args.model_name):
        raise InvalidArgument("--model-name", f"got {args.model_name!r}; letters, digits, '.', '_' and '-' only")


def server_argv(args: argparse.Namespace) -> list[str]:
    argv = [str(args.model_dir), "--host", args.host, "--port", str(args.port), "--metrics-port",
            str(args.metrics_port), "--max-batch", str(args.max_batch), "--dtype", args.dtype, "--threads",
            str(args.threads)]
    for flag, value in (("--model-name", args.model_name), ("--device", args.device), ("--port-file", args.port_file)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def venv_python(venv: Path) -> Path:
    """The Triton environment's interpreter, once make-venv.sh finished it (its stamp is written last)."""
    python = venv / "bin" / "python"
    if not python.exists() or not any(venv.glob(".installed-*")):
        raise InvalidArgument("--venv", f"no Triton environment at {venv}: run `make triton-venv` "
                                        "(deploy/triton/make-venv.sh)")
    return python


def _here_is_triton_env() -> bool:
    if importlib.util.find_spec("pytriton") is None:
        return False
    import numpy

    return int(numpy.__version__.split(".")[0]) < 2


def run(args: argparse.Namespace) -> int:
    _check(args)
    argv = server_argv(args)
    if _here_is_triton_env():
        from difflens.triton.server import main

        return main(argv)
    venv = args.venv or Path(os.environ.get("DIFFLENS_TRITON_VENV") or DEFAULT_VENV)
    python = str(venv_python(venv))
    sys.stdout.flush()
    sys.stderr.flush()
    package_parent = str(Path(__file__).resolve().parents[2])
    os.execv(python, [python, "-c", BOOT, package_parent, *argv])
    return 1  # not reached
