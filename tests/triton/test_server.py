"""The triton backend against a real Triton server (`difflens triton-serve` of the tiny model, max_batch_size 4):
the same image and maps as the eager backend, batches split at the server's limit, Triton's own metrics, and the
start-up checks that refuse a server that does not serve what difflens sends, naming the flag to fix."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from difflens.config import Settings
from difflens.engine.explain import run_explanation
from difflens.engine.options import AttentionOptions, CamOptions, ExplainOptions, GenerationParams, RiseOptions
from difflens.engine.runner import UNetRunner
from difflens.errors import BackendUnavailable, InvalidArgument, NotReady
from difflens.triton.client import connect_unet, probe_inputs
from tests.worker.helpers import CAM_LAYERS


def test_image_and_maps_equal_the_eager_backends(triton_server, triton_settings, tiny_model):
    remote = connect_unet(triton_settings, "tiny", tiny_model.unet)
    try:
        params = GenerationParams("a red circle", seed=1, steps=3, guidance_scale=2.0)
        options = ExplainOptions(rise=RiseOptions(num_masks=8, batch_size=8), cam=CamOptions(layers=CAM_LAYERS),
                                 attention=AttentionOptions())
        requests = triton_server.metric("nv_inference_request_success", model="tiny")
        samples = triton_server.metric("nv_inference_count", model="tiny")
        got = run_explanation(tiny_model, params, options, runner=UNetRunner(tiny_model.unet, "triton", remote=remote))
    finally:
        remote.close()
    want = run_explanation(tiny_model, params, options, runner=UNetRunner(tiny_model.unet))
    assert got.params["unet_backend"] == "triton" and got.timesteps == want.timesteps
    assert np.abs(got.image.astype(int) - want.image.astype(int)).max() <= 1
    for g, w in zip(got.steps, want.steps, strict=True):
        assert set(g.maps) == set(w.maps) and {"rise", "cam", "attn"} <= set(g.maps)
        for name in w.maps:
            torch.testing.assert_close(g.maps[name], w.maps[name], atol=1e-4, rtol=1e-4, msg=name)
    # Denoising: one CFG call of 2 samples per step. DF-RISE: 8 masks x 2 branches = 16 samples per step, which
    # max_batch_size 4 splits into 4 calls. Triton counts both in its own metrics (the dashboard's panels).
    want_requests, want_samples = requests + 3 * (1 + 4), samples + 3 * (2 + 16)
    assert triton_server.metric_reaches("nv_inference_request_success", want_requests, model="tiny") == want_requests
    assert triton_server.metric_reaches("nv_inference_count", want_samples, model="tiny") == want_samples


def test_a_dtype_the_server_does_not_take_is_refused_at_start_up_naming_the_flag(triton_server, tiny_dir, tmp_path,
                                                                                 capsys):
    from difflens import cli

    out = tmp_path / "run"
    code = cli.main(["explain", str(tiny_dir), "a red circle", "--out", str(out), "--steps", "1", "--methods",
                     "none", "--backend", "triton", "--triton-url", triton_server.url, "--triton-model", "tiny",
                     "--dtype", "float16"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "difflens: error: --triton-model: tiny: input 'sample' is TYPE_FP32 on the server, difflens sends TYPE_FP16 "
        "(dtype float16)")


def test_a_server_with_other_weights_is_refused(triton_server, triton_settings, tmp_path):
    from difflens.engine.loading import load_model
    from difflens.engine.tiny import make_tiny_model

    other = load_model(make_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(InvalidArgument) as e:
        connect_unet(triton_settings, "tiny", other.unet)
    assert e.value.field == "triton_models" and e.value.message.startswith("tiny: its output on a probe input is ")
    assert "other weights than the model folder's" in e.value.message


def test_a_call_past_its_timeout_fails_unavailable_naming_the_variable_and_the_next_call_succeeds(
        triton_server, triton_settings, tiny_model):
    remote = connect_unet(triton_settings, "tiny", tiny_model.unet)
    try:
        assert remote.call_timeout_s == triton_settings.triton_call_timeout_s == 120.0
        latents, t, embeds = probe_inputs(tiny_model.unet, remote.served)
        remote.call_timeout_s = 1e-4  # no server answers within 100 us: gRPC's deadline ends the call
        with pytest.raises(BackendUnavailable) as e:
            remote(latents, t, embeds)
        assert str(e.value) == (f"the UNet's Triton server at {triton_server.url} (model 'tiny') did not answer within "
                                "0.0001 s (DIFFLENS_TRITON_CALL_TIMEOUT_S); submit the job again")
        remote.call_timeout_s = 120.0
        got = remote(latents, t, embeds)
    finally:
        remote.close()
    with torch.no_grad():
        want = tiny_model.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_stalled_server_fails_the_call_at_its_timeout_and_is_not_ready():
    """A peer that takes the connection and never answers (a hung server, a black-holed route): the call ends at
    its timeout with BackendUnavailable, and the readiness check says so within its own short timeout."""
    from difflens.triton.client import READY_CALL_TIMEOUT_S, ServedModel, TritonUNet

    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)
        url = f"127.0.0.1:{stalled.getsockname()[1]}"
        remote = TritonUNet(url, "tiny", ServedModel(max_batch=4, dims={}), call_timeout_s=0.5)
        try:
            with pytest.raises(BackendUnavailable) as e:
                remote(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), torch.zeros(1, 8, 32))
            assert "did not answer within 0.5 s (DIFFLENS_TRITON_CALL_TIMEOUT_S)" in str(e.value)
            assert remote.ready() == (False, f"Triton model 'tiny' at {url}: no answer within "
                                             f"{READY_CALL_TIMEOUT_S:g} s")
        finally:
            remote.close()


def test_an_unknown_model_or_no_server_names_its_flag(triton_server, tiny_model):
    unknown = Settings(unet_backend="triton", triton_url=triton_server.url, triton_models=(("", "sd15"),),
                       triton_wait_s=0.0)
    with pytest.raises(NotReady) as e:
        connect_unet(unknown, "tiny", tiny_model.unet)
    assert str(e.value).startswith(f"--triton-model: the server has no model 'sd15' ready at {triton_server.url}")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(NotReady) as e:
        connect_unet(Settings(unet_backend="triton", triton_url=nobody, triton_wait_s=0.0), "tiny", tiny_model.unet)
    assert str(e.value).startswith(f"--triton-url: no Triton server ready at {nobody} (waited 0 s, "
                                   "DIFFLENS_TRITON_WAIT_S)")


def test_the_dashboards_triton_series_are_what_the_server_exports(triton_server):
    """The dashboard's nv_inference_* queries are checked against tests/support/promtool.py's TRITON_SERIES; this
    holds that list to a real tritonserver's scrape: every series there, with exactly those labels."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.promtool import TRITON_SERIES

    with urllib.request.urlopen(f"http://127.0.0.1:{triton_server.metrics_port}/metrics", timeout=10) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    exported = {f.name: {frozenset(s.labels) for s in f.samples} for f in families}
    for name, labels in TRITON_SERIES.items():
        assert exported.get(name) == {labels}, name
