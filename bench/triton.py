"""The triton UNet backend's cost: `difflens triton-serve`'s start-up time, and one UNet call through Triton against
the same call eager in this process, per batch size, on the same weights and thread count.

The server is the real one (nvidia-pytriton's tritonserver, Python backend, in the Triton environment that
`make triton-venv` builds), started with --threads T; this process runs torch with T threads too, so the two sides
do the same arithmetic and the difference is what the hop costs: numpy copies, gRPC, Triton's scheduling and the
Python backend's IPC. Eager and Triton calls alternate within each round; figures are medians over rounds, and the
fastest round of each (on a busy shared machine the medians move with the neighbours' load, the minima less).
    PYTHONPATH=service .venv/bin/python -m bench.triton [--model DIR] [--batches 1,2,16] [--rounds 7] [--calls 20]
                                                        [--threads 1]
Without --model, the tests' tiny model (make_tiny_model, 16 x 16 latents). Writes bench/results/triton.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "triton.json"


def start_server(model_dir: Path, threads: int, work: Path) -> tuple[subprocess.Popen[bytes], int, float]:
    """`difflens triton-serve` on free ports -> (process, gRPC port, seconds until it was ready). In this process's
    session: Linux's autogroup shares the CPU between sessions, and a server in a session of its own would get a
    share of its own, beating the eager side on a busy machine for no reason of its own."""
    port_file = work / "port.json"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "difflens", "triton-serve", str(model_dir), "--model-name", "bench",
                             "--port", "0", "--metrics-port", "0", "--threads", str(threads), "--port-file",
                             str(port_file)], stdout=subprocess.DEVNULL, stderr=(work / "server.log").open("wb"))
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            raise SystemExit(f"triton-serve did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())["port"], time.monotonic() - t0


def per_call_ms(fn: Any, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--batches", default="1,2,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from difflens.config import Settings
    from difflens.engine.loading import load_model
    from difflens.engine.tiny import make_tiny_model
    from difflens.triton.client import connect_unet

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="difflens-bench-triton-") as tmp:
        work = Path(tmp)
        model_dir = args.model or make_tiny_model(work / "tiny")
        model = load_model(model_dir)
        proc, port, start_s = start_server(Path(model_dir), args.threads, work)
        try:
            remote = connect_unet(Settings(unet_backend="triton", triton_url=f"127.0.0.1:{port}",
                                           triton_models=(("", "bench"),)), "bench", model.unet)
            cfg = model.unet.config
            side = int(cfg.sample_size)
            rows = []
            for b in (int(x) for x in args.batches.split(",")):
                g = torch.Generator().manual_seed(b)
                x = torch.randn(b, int(cfg.in_channels), side, side, generator=g)
                e = torch.randn(b, 77, int(cfg.cross_attention_dim), generator=g)
                t = torch.full((b,), 500)

                def eager() -> None:
                    with torch.no_grad():
                        model.unet(x, t, encoder_hidden_states=e, return_dict=False)  # noqa: B023

                def served() -> None:
                    remote(x, t, e)  # noqa: B023

                eager(), served()  # warm both
                eager_ms, triton_ms = [], []
                for _ in range(args.rounds):
                    eager_ms.append(per_call_ms(eager, args.calls))
                    triton_ms.append(per_call_ms(served, args.calls))
                e_ms, t_ms = statistics.median(eager_ms), statistics.median(triton_ms)
                e_min, t_min = min(eager_ms), min(triton_ms)
                rows.append({"batch": b, "eager_ms": round(e_ms, 3), "triton_ms": round(t_ms, 3),
                             "overhead_ms": round(t_ms - e_ms, 3), "ratio": round(t_ms / e_ms, 3),
                             "eager_min_ms": round(e_min, 3), "triton_min_ms": round(t_min, 3),
                             "overhead_min_ms": round(t_min - e_min, 3)})
            remote.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"triton-serve ready in {start_s:.1f} s; {side} x {side} latents, {args.threads} torch thread(s) each side, "
          f"medians of {args.rounds} rounds x {args.calls} calls")
    print("| batch | eager ms/call | triton ms/call | overhead ms | ratio | fastest: eager / triton / overhead |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['eager_ms']:.2f} | {r['triton_ms']:.2f} | {r['overhead_ms']:.2f} "
              f"| {r['ratio']:.2f} | {r['eager_min_ms']:.2f} / {r['triton_min_ms']:.2f} / {r['overhead_min_ms']:.2f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"start_s": round(start_s, 2), "threads": args.threads, "latent": side,
                                   "rounds": args.rounds, "calls": args.calls, "rows": rows,
                                   "machine": platform.machine(), "load_1m": os.getloadavg()[0],
                                   "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
