"""The pytriton server of one model folder's UNet (`difflens triton-serve`, which runs this module in the Triton
environment: see commands/triton_serve.py). It declares difflens's contract (triton/contract.py) with dynamic
batching on.

Runs where numpy < 2, torch, diffusers and nvidia-pytriton are installed, and imports nothing else of difflens but
the contract. pytriton starts `tritonserver` as a child process and answers its Python backend from this one (the
UNet runs here). Ready when the port file is written; SIGTERM or SIGINT stops both cleanly.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from difflens.triton import contract

log = logging.getLogger("difflens.triton.server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="difflens triton-serve")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-name")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--dtype", choices=tuple(contract.TRITON_TYPES), default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--port-file", type=Path)
    return p.parse_args(argv)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def load_unet(model_dir: Path, dtype: str, device: str) -> Any:
    """The folder's UNet, offline and from safetensors only (as difflens's loader)."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True,
                                                local_files_only=True, torch_dtype=getattr(torch, dtype))
    return unet.to(device).eval()


def infer_function(unet: Any, device: str) -> Any:
    """The batched inference callable: numpy in, numpy out, contract names."""
    import numpy as np
    import torch
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        sample = torch.from_numpy(inputs[contract.SAMPLE]).to(device)
        timestep = torch.from_numpy(inputs[contract.TIMESTEP][:, 0]).to(device)
        embeds = torch.from_numpy(inputs[contract.ENCODER_HIDDEN_STATES]).to(device)
        with torch.inference_mode():
            out = unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        return {contract.OUTPUT: out.cpu().numpy()}

    return infer


def _stop_on_term(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # the serving loop's cue to stop Triton and its child processes


def serve(args: argparse.Namespace) -> int:
    # tritonserver's Python backend stub links libpython: find this interpreter's, wherever it was installed.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    home = tempfile.mkdtemp(prefix="difflens-pytriton-")
    os.environ["PYTRITON_HOME"] = home  # read when pytriton is imported: its workspace, removed on stop
    # After pytriton's own stop threads (a crashed tritonserver starts one) are done: the interpreter joins them
    # before it runs atexit functions.
    atexit.register(shutil.rmtree, home, True)

    import numpy as np
    import torch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    if int(np.__version__.split(".")[0]) >= 2:  # the server would answer every request with empty outputs
        print(f"difflens triton-serve: numpy {np.__version__} here; tritonserver's Python backend needs numpy < 2 "
              "(run deploy/triton/make-venv.sh)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    unet = load_unet(args.model_dir, args.dtype, device)
    cfg = unet.config
    inputs, outputs = contract.unet_tensors(args.dtype, int(cfg.in_channels), int(cfg.out_channels),
                                            int(cfg.cross_attention_dim))
    np_type = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}

    def tensors(specs: tuple[contract.TensorSpec, ...]) -> list[Tensor]:
        return [Tensor(name=t.name, dtype=np_type[t.data_type], shape=t.dims) for t in specs]

    port = args.port or free_port(args.host)
    metrics_port = args.metrics_port or free_port(args.host)
    name = args.model_name or args.model_dir.resolve().name
    config = TritonConfig(grpc_address=args.host, grpc_port=port, allow_http=False, metrics_address=args.host,
                          metrics_port=metrics_port, allow_metrics=True, exit_timeout_secs=5)
    signal.signal(signal.SIGTERM, _stop_on_term)
    triton = Triton(config=config)
    try:
        triton.bind(model_name=name, infer_func=infer_function(unet, device), inputs=tensors(inputs),
                    outputs=tensors(outputs),
                    config=ModelConfig(max_batch_size=args.max_batch, batcher=DynamicBatcher()), strict=True)
        triton.run()
        if args.port_file is not None:
            tmp = args.port_file.with_name(f".{args.port_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"port": port, "metrics_port": metrics_port}) + "\n")
            tmp.replace(args.port_file)  # readers never see a partial file
        print(f"difflens triton-serve: model {name!r} ({args.model_dir}, {args.dtype}, {device}, max batch "
              f"{args.max_batch}) on {args.host}:{port} (gRPC), metrics on {args.host}:{metrics_port}",
              file=sys.stderr, flush=True)
        while triton.is_alive():
            time.sleep(0.5)
        print("difflens triton-serve: the server stopped on its own", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("difflens triton-serve: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean stop short
        triton.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
