"""Shared by the worker and audit tests: settings on the tiny model, job specs, waiting for a job's end."""

from __future__ import annotations

import time
from typing import Any

from difflens.config import ServiceSettings
from difflens.engine.options import AttentionOptions, CamOptions, ExplainOptions, GenerationParams, RiseOptions
from difflens.jobs import Event, JobSpec, OutputOptions
from difflens.queue.base import JobQueue, is_terminal

MODEL = "tiny"
# Two CAM layers keep DF-CAM cheap on the CPU; the full default set is exercised by the engine's tests.
CAM_LAYERS = ("down_blocks.0.attentions.0", "up_blocks.1.resnets.0")


def settings(tiny_dir: Any, **kw: Any) -> ServiceSettings:
    values: dict[str, Any] = {"models": ((MODEL, str(tiny_dir)),), "visibility_timeout_s": 5.0,
                              "heartbeat_interval_s": 0.2, "worker_max_jobs": 2, "worker_max_batch": 64}
    values.update(kw)
    return ServiceSettings(**values)


def spec(prompt: str = "a red circle", *, seed: int = 0, steps: int = 3, methods: tuple[str, ...] = ("rise",),
         masks: int = 8, batch: int = 4, output: OutputOptions | None = None, deadline: float | None = None,
         guidance: float = 2.0, cam_layers: tuple[str, ...] = CAM_LAYERS, **gen: Any) -> JobSpec:
    """A job for MODEL; the family tests pass their guidance, DF-CAM layers and scheduler."""
    explain = ExplainOptions(
        rise=RiseOptions(num_masks=masks, batch_size=batch, seed=seed) if "rise" in methods else None,
        cam=CamOptions(layers=cam_layers) if "cam" in methods else None,
        attention=AttentionOptions() if "attn" in methods else None)
    params = GenerationParams(prompt, seed=seed, steps=steps, guidance_scale=guidance, **gen)
    return JobSpec(model=MODEL, params=params, explain=explain, output=output or OutputOptions(), deadline=deadline)


def wait_terminal(queue: JobQueue, job_id: str, timeout: float = 120.0) -> list[Event]:
    """Every event of the job, in sequence order, once its terminal event is there (fails after `timeout` s)."""
    events: list[Event] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for seq, ev in queue.events(job_id, after=len(events) - 1, block_s=0.5):
            assert seq == len(events), f"sequence gap: got {seq}, expected {len(events)}"
            events.append(ev)
        if events and is_terminal(events[-1]):
            return events
    raise AssertionError(f"job {job_id} not terminal after {timeout} s; events so far: {events}")


def wait_for(queue: JobQueue, job_id: str, kind: type, timeout: float = 60.0) -> list[Event]:
    """Events up to and including the first of `kind`."""
    events: list[Event] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        events += [ev for _, ev in queue.events(job_id, after=len(events) - 1, block_s=0.2)]
        if any(isinstance(e, kind) for e in events):
            return events
    raise AssertionError(f"no {kind.__name__} event for job {job_id} within {timeout} s: {events}")


def solo(model: Any, job: JobSpec) -> Any:
    """The engine-only run of a job (what `difflens explain` computes): the reference for every worker result."""
    from difflens.engine import families
    from difflens.engine.explain import run_explanation

    # the family's runner: a transformer (SD3, FLUX) is called its own way, not as a UNet
    return run_explanation(model, job.params, job.explain, runner=families.runner(model))


def run_one(model: Any, s: ServiceSettings, job: JobSpec, name: str = "w") -> list[Event]:
    """Run one job on a fresh InProcessQueue and Worker (model preloaded); its events, terminal last."""
    from difflens.models import ModelRegistry
    from difflens.queue.memory import InProcessQueue
    from difflens.worker import Worker

    queue = InProcessQueue(s)
    job_id = queue.enqueue(job).id
    worker = Worker(s, queue, ModelRegistry(s, preloaded={MODEL: model}), name=name)
    worker.start()
    try:
        return wait_terminal(queue, job_id)
    finally:
        worker.stop(timeout=60)


def png_image(event: Any) -> Any:
    """A Completed event's image as (H, W, 3) uint8."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.image_png)).convert("RGB"))


def assert_streamed_as_the_engine(events: list[Any], ref: Any, cam_layers: tuple[str, ...]) -> Any:
    """A three-step job with every method, float16 maps and x0 previews on a family's tiny model (16 x 16
    latents, prompt "a red circle"): its events are Queued, Started, a Step per step with exactly the engine's maps
    (`ref`, from solo) as float16, the three words' attention maps and a preview, then Completed with the engine's
    image. Returns the Completed event."""
    import numpy as np

    from difflens.jobs import Completed, Queued, Started, Step

    assert [type(e) for e in events] == [Queued, Started, Step, Step, Step, Completed]
    steps = [e for e in events if isinstance(e, Step)]
    assert [st.timestep for st in steps] == ref.timesteps
    for st, r in zip(steps, ref.steps, strict=True):
        assert set(st.maps) == {"rise", "rise_raw", "rise_mean", "cam", *(f"cam/{p}" for p in cam_layers)}
        for name, m in st.maps.items():
            assert m.shape == (16, 16)
            np.testing.assert_array_equal(m, r.maps[name].numpy().astype(np.float16), err_msg=name)
        assert [t.token for t in st.tokens] == ["a", "red", "circle"]
        np.testing.assert_array_equal(np.stack([t.map for t in st.tokens]), r.maps["attn"].numpy().astype(np.float16))
        assert st.x0_preview is not None and st.x0_preview.shape == (3, 32, 32)
    done = events[-1]
    np.testing.assert_array_equal(png_image(done), ref.image)
    return done
