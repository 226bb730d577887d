"""SD3 through the service: the torch-free catalog describes it, a worker on the real InProcessQueue streams an SD3
job's steps with every map equal to the engine's, the audit record (family, three text encoders) replays, the
memory estimate traces the transformer's call, and the triton backend refuses it as it refuses SDXL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflens.cli import main
from difflens.engine import families
from difflens.engine.memory import LiveBytes, MemoryEstimator
from difflens.engine.runner import UNetRunner
from difflens.errors import InvalidArgument
from difflens.jobs import JobSpec, OutputOptions
from tests.worker.helpers import MODEL, assert_streamed_as_the_engine, settings, solo, spec, wait_terminal

CAM_LAYERS = ("transformer_blocks.0", "transformer_blocks.1")
ROOT = Path(__file__).resolve().parents[2]


def sd3_spec(prompt: str, *, seed: int, output: OutputOptions | None = None) -> JobSpec:
    return spec(prompt, seed=seed, methods=("rise", "cam", "attn"), output=output, guidance=5.0,
                cam_layers=CAM_LAYERS, scheduler="euler")


def test_an_sd3_job_streams_the_engine_s_maps_and_its_record_replays(tiny_sd3_dir, tiny_sd3, tmp_path, capsys):
    from difflens.models import ModelRegistry
    from difflens.queue.memory import InProcessQueue
    from difflens.worker import Worker

    s = settings(tiny_sd3_dir)
    queue = InProcessQueue(s)
    job = sd3_spec("a red circle", seed=1, output=OutputOptions(map_dtype="float16", include_x0_previews=True))
    ref = solo(tiny_sd3, job)
    job_id = queue.enqueue(job).id
    worker = Worker(s, queue, ModelRegistry(s, preloaded={MODEL: tiny_sd3}), name="w-sd3")
    worker.start()
    try:
        events = wait_terminal(queue, job_id)
    finally:
        worker.stop(timeout=120)
        queue.close()

    done = assert_streamed_as_the_engine(events, ref, CAM_LAYERS)
    flow = tiny_sd3.scheduler.__class__.from_config(tiny_sd3.scheduler.config)
    flow.set_timesteps(3)
    assert ref.timesteps == [round(float(t)) for t in flow.timesteps]  # sigma x T
    record = json.loads(done.audit_json)
    assert record["model"]["family"] == "sd3" and record["resolved"]["family"] == "sd3"
    assert {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "text_encoder_3/model.safetensors",
            "transformer/diffusion_pytorch_model.safetensors"} <= set(record["model"]["weights_sha256"])
    assert {"tokenizer_3/tokenizer.json", "transformer/config.json"} <= set(record["model"]["config_sha256"])

    path = tmp_path / "audit.json"
    path.write_text(json.dumps(record))
    assert main(["replay", str(path), "--model", f"{MODEL}={tiny_sd3_dir}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("image.", "step"))]
    assert len(rows) == 2 + sum(len(m) for m in record["hashes"]["maps"].values())
    assert all(line.rstrip().endswith("yes") for line in rows)


def test_the_memory_trace_of_an_sd3_call_counts_what_the_real_call_allocates(tiny_sd3):
    family = families.of(tiny_sd3)
    (seq, dim), shapes = family.conditioning_shapes(tiny_sd3)
    assert (seq, dim) == (77 + 256, 32) and shapes == {"pooled_projections": (32,)}
    est = MemoryEstimator(tiny_sd3)
    one = est.per_sample("forward", (4, 16, 16))
    x, embeds, added = torch.randn(1, 4, 16, 16), torch.randn(1, seq, dim), {k: torch.randn(1, *s) for k, s in
                                                                              shapes.items()}
    count = LiveBytes()
    with torch.no_grad(), count:
        family.call(tiny_sd3.unet, x, 999, embeds, added)
    assert one > 0 and abs(count.peak - one) <= 0.1 * one
    assert est.per_sample("cam", (4, 16, 16)) > 1.5 * one  # the backward's saved activations and the gradients
    assert est.per_sample("attn", (4, 16, 16)) > 0


def test_the_triton_backend_refuses_an_sd3_transformer(tiny_sd3):
    runner = UNetRunner(tiny_sd3.unet, "triton", remote=lambda *a: a[0], call=families.of(tiny_sd3).call)
    prompt = families.of(tiny_sd3).encode(tiny_sd3, "a", "", (32, 32))
    with pytest.raises(InvalidArgument) as e:
        runner.raw(torch.zeros(2, 4, 16, 16), 999, prompt.embeds, prompt.added)
    assert e.value.field == "unet_backend" and "use eager or compile" in e.value.message


def test_the_front_describes_and_validates_an_sd3_model_without_torch(tiny_sd3_dir, tiny_sd3):
    """The catalog reads SD3's folder (three tokenizers, T5's a tokenizer.json; the transformer's config) where
    torch cannot be imported, and agrees with the loaded model: DF-CAM's blocks, the prompt limit and words of
    CLIP (the first tokenizer, whose 77 positions the attention maps read), the difflens.json default scheduler;
    a scheduler other than the flow-matching Euler is refused there, naming the allowed one."""
    from difflens.engine.cam import camable_layers
    from difflens.engine.tokens import prompt_tokens

    code = ("import json, sys; from tests.support.no_torch import _Refuse; sys.meta_path.insert(0, _Refuse()); "
            "from difflens.catalog import ModelCatalog, describe; from difflens.config import Limits; "
            "from difflens.engine.options import GenerationParams; from difflens.errors import InvalidArgument; "
            "from difflens.engine.tokens import prompt_tokens; from difflens.jobs import JobSpec; "
            "from difflens.validation import validate; "
            f"e = describe('sd3', {str(tiny_sd3_dir)!r}); c = ModelCatalog({{'sd3': e}}, 'sd3'); "
            "validate(JobSpec(model='sd3', params=GenerationParams('a red circle', steps=5)), c, Limits()); "
            "refused = None\n"
            "try: validate(JobSpec(model='sd3', params=GenerationParams('a', scheduler='ddim')), c, Limits())\n"
            "except InvalidArgument as err: refused = str(err)\n"
            "print(json.dumps([e.family.name, list(e.cam_layers), e.max_prompt_tokens, e.defaults.scheduler, "
            "[t.text for t in prompt_tokens(e.tokenizer, 'a red circle')], refused]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    family, layers, limit, scheduler, words, refused = json.loads(out.stdout)
    assert family == "sd3" and limit == 75 and scheduler == "euler"
    assert layers == list(camable_layers(tiny_sd3.unet)) == list(CAM_LAYERS)
    assert words == [t.text for t in prompt_tokens(tiny_sd3.tokenizer, "a red circle")] == ["a", "red", "circle"]
    assert refused == "scheduler: got 'ddim'; allowed: euler"
