"""The front without torch: `difflens serve` (not embedded) validates and lists models from config and tokenizer
files alone, in a process where importing torch, diffusers or transformers fails, against a real Redis; and it makes
every model's consumer group at start-up, before any worker runs (KEDA's lag trigger reads it)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis

from difflens.client import DifflensClient
from difflens.config import SHIPPED_MODEL
from difflens.engine.cam import camable_layers
from difflens.engine.options import CamOptions, ExplainOptions, Sampling
from difflens.queue.redis_work import GROUP, work_stream
from tests.api.helpers import MODEL, free_port, job
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_server_and_the_cli_loads_no_torch():
    code = ("import sys, difflens.api.server, difflens.cli, difflens.catalog, difflens.validation; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_blocker_does_block():
    """The serving test below means something only if the blocker really refuses an import."""
    code = ("import sys; sys.argv = ['x', 'make-tiny-model', '/nonexistent/x']; "
            "from tests.support.no_torch import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "no_torch: torch imported" in out.stderr


def test_an_sdxl_model_is_described_and_validated_without_torch(tiny_sdxl_dir, tiny_sdxl):
    """The catalog reads SDXL's folder (two tokenizers, the UNet's config) where torch cannot be imported, and
    agrees with the loaded model: DF-CAM's layers, and the words the attention maps are labelled with (the first
    tokenizer's)."""
    import json

    from difflens.engine.tokens import prompt_tokens

    code = ("import json, sys; from tests.support.no_torch import _Refuse; sys.meta_path.insert(0, _Refuse()); "
            "from difflens.catalog import ModelCatalog, describe; from difflens.config import Limits; "
            "from difflens.engine.options import AttentionOptions, ExplainOptions, GenerationParams; "
            "from difflens.engine.tokens import prompt_tokens; from difflens.jobs import JobSpec; "
            "from difflens.validation import validate; "
            f"e = describe('xl', {str(tiny_sdxl_dir)!r}); "
            "validate(JobSpec(model='xl', params=GenerationParams('a red circle', width=32, height=48), "
            "explain=ExplainOptions(attention=AttentionOptions())), ModelCatalog({'xl': e}, 'xl'), Limits()); "
            "print(json.dumps([e.family.name, list(e.cam_layers), e.max_prompt_tokens, "
            "[t.text for t in prompt_tokens(e.tokenizer, 'a red circle')]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    family, layers, limit, words = json.loads(out.stdout)
    assert family == "sdxl" and limit == 75
    assert layers == list(camable_layers(tiny_sdxl.unet))
    assert words == [t.text for t in prompt_tokens(tiny_sdxl.tokenizer, "a red circle")] == ["a", "red", "circle"]


@pytest.fixture
def front(tiny_dir, redis_url, queue_name, tmp_path):
    port_file, log_path, metrics_port = tmp_path / "port", tmp_path / "front.log", free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIFFLENS_REDIS_URL": redis_url, "DIFFLENS_QUEUE": queue_name}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.no_torch", "serve", "--port", "0",
                                 "--port-file", str(port_file), "--model", f"{MODEL}={tiny_dir}",
                                 "--model", f"shapes={SHIPPED_MODEL}", "--metrics-port", str(metrics_port),
                                 "--no-auth"],
                                stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    wait_until(lambda: port_file.exists() or proc.poll() is not None, 300, 0.05, log_path.read_text)
    assert proc.poll() is None, log_path.read_text()
    try:
        yield f"127.0.0.1:{port_file.read_text().strip()}", log_path, metrics_port
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert "no_torch" not in log_path.read_text()


def test_the_front_lists_validates_and_queues_without_torch(front, tiny_model, redis_url, queue_name):
    target, log_path, metrics_port = front
    ready = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=10).read()
    assert ready == b"serving\n"
    r = redis.Redis.from_url(redis_url)
    for model in (MODEL, "shapes"):  # made by the front, before any worker
        assert [g["name"] for g in r.xinfo_groups(work_stream(queue_name, model))] == [GROUP.encode()]
    with DifflensClient(target, retries=0) as client:
        listed = {m.name: m for m in client.list_models().models}
        assert list(listed[MODEL].cam_layers) == list(camable_layers(tiny_model.unet))
        assert listed["shapes"].default_width == 32
        queued = client.submit(job(methods=("rise", "cam", "attn")))
        assert client.get(queued.id).state == "queued"
        for scheduler in ("ddim", "ddpm", "dpmsolver++", "euler"):
            assert client.submit(job(scheduler=scheduler, steps=7)).state == "queued"
        assert client.submit(job(sampling=Sampling(kind="early"), steps=5)).state == "queued"
        assert client.submit(job(sampling=Sampling(kind="explicit", timesteps=(900, 500, 100)))).state == "queued"
        with pytest.raises(grpc.RpcError) as bad_layer:
            client.submit(dataclasses.replace(job(), explain=ExplainOptions(
                cam=CamOptions(layers=("up_blocks.9.resnets.0",)))))
        with pytest.raises(grpc.RpcError) as long_prompt:
            client.submit(job(prompt="red " * 200))
    assert bad_layer.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cam.layers" in bad_layer.value.details() and "up_blocks.9.resnets.0" in bad_layer.value.details()
    assert long_prompt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in long_prompt.value.details() and "tokens" in long_prompt.value.details()
