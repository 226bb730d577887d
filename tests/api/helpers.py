"""Shared by the API tests: service settings on the tiny model, job specs, a free port, collecting a stream."""

from __future__ import annotations

import socket
import threading
from typing import Any

from difflens.config import ServiceSettings
from difflens.engine.options import AttentionOptions, CamOptions, ExplainOptions, GenerationParams, RiseOptions
from difflens.jobs import JobSpec, OutputOptions

MODEL = "tiny"
# Two CAM layers keep DF-CAM cheap on the CPU; the full default set is exercised by the engine's tests.
CAM_LAYERS = ("down_blocks.0.attentions.0", "up_blocks.1.resnets.0")


def settings(tiny_dir: Any, **kw: Any) -> ServiceSettings:
    values: dict[str, Any] = {"models": ((MODEL, str(tiny_dir)),), "port": 0, "visibility_timeout_s": 5.0,
                              "heartbeat_interval_s": 0.2, "worker_max_jobs": 2, "drain_grace_s": 10.0}
    values.update(kw)
    return ServiceSettings(**values)


def job(prompt: str = "a red circle", *, steps: int = 3, methods: tuple[str, ...] = ("rise",), masks: int = 8,
        batch: int = 4, output: OutputOptions | None = None, key: str = "", model: str = MODEL,
        **gen: Any) -> JobSpec:
    explain = ExplainOptions(
        rise=RiseOptions(num_masks=masks, batch_size=batch) if "rise" in methods else None,
        cam=CamOptions(layers=CAM_LAYERS) if "cam" in methods else None,
        attention=AttentionOptions() if "attn" in methods else None)
    params = GenerationParams(prompt, steps=steps, guidance_scale=2.0, **gen)
    return JobSpec(model=model, params=params, explain=explain, output=output or OutputOptions(),
                   idempotency_key=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Watchers:
    """n concurrent raw WatchJob calls on one job (no client-side resume), each on its own thread; `codes` gets
    each call's ending status name ("OK" for a stream that ended normally). `join()` waits for them all."""

    def __init__(self, client: Any, job_id: str, n: int, timeout_s: float) -> None:
        import grpc

        from difflens.api.pb import pb

        self.codes: list[str] = []

        def one() -> None:
            try:
                for _ in client.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout_s):
                    pass
                self.codes.append("OK")
            except grpc.RpcError as e:
                self.codes.append(e.code().name)

        self.threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def join(self) -> list[str]:
        for t in self.threads:
            t.join()
        return sorted(self.codes)
