"""bench.gpu: the SD1.5-shaped UNet it builds, its time budget, the CUDA-graph runner's refusals, and one tiny CPU
run end to end (the JSON's structure; every ratio a finite number where its section ran)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_sections
from bench.gpu import SECTIONS
from bench.gpu_graphs import GraphedRunner
from bench.gpu_model import SD15, SD15_PARAMETERS, TINY, build_unet, make_inputs, make_state, parameter_count
from difflens.engine.runner import UNetRunner

ROOT = Path(__file__).resolve().parents[1]


def test_the_sd15_shaped_unet_builds_on_the_meta_device_with_sd15s_parameter_count():
    unet = build_unet(SD15, "meta")
    assert parameter_count(unet) == SD15_PARAMETERS
    assert all(p.is_meta for p in unet.parameters())  # shapes only: nothing allocated
    assert unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert unet.config.cross_attention_dim == 768 and unet.config.attention_head_dim == 8
    assert SD15.latent == (4, 64, 64) and SD15.embed == (77, 768)


def test_the_budget_trims_rounds_to_a_sections_share_of_what_is_left_never_below_two():
    budget = gpu_sections.Budget(100.0, {"a": 1, "b": 3})
    assert budget.repeats("a", round_s=1.0, wanted=50) in (24, 25)  # a quarter of the ~100 s left
    assert budget.repeats("a", round_s=1.0, wanted=7) == 7
    assert budget.repeats("a", round_s=1000.0, wanted=7) == 2
    budget.done("a")
    assert budget.repeats("b", round_s=1.0, wanted=500) in (99, 100)  # all that is left


@pytest.fixture
def one_thread():
    """As bench.gpu --tiny: a tiny UNet gains nothing from a second thread, and on a busy 2-core machine OpenMP's
    spin-waiting made each call 10-20x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_backend_section_times_its_runner_on_the_eager_states_tensors(one_thread):
    from bench.gpu import TINY_PLAN, WEIGHTS

    unet = build_unet(TINY)
    env = gpu_sections.Env(torch.device("cpu"), torch.float32, TINY, make_inputs(TINY), TINY_PLAN,
                           gpu_sections.Budget(60.0, WEIGHTS))
    eager = env.state(UNetRunner(unet))
    other = UNetRunner(unet)  # stands in for compile / CUDA graphs: the section must time this one
    out = gpu_sections.backend(env, "compile", eager, other, batch=2, eager_masks_per_s=1.0)
    assert out["batch"] == 2 and out["masks"] % 2 == 0 and out["repeats"] >= 2
    assert out["ratios"]["speedup_vs_eager"] == out["masks_per_s"]
    assert math.isfinite(out["ratios"]["explainer_vs_bare"]) and out["first_call_s"] > 0


def test_the_graphed_runner_refuses_a_cpu_tensor_and_a_call_with_gradients():
    unet = build_unet(TINY)
    runner = GraphedRunner(unet)
    x = torch.zeros(2, *TINY.latent)
    e = torch.zeros(2, *TINY.embed)
    with torch.no_grad(), pytest.raises(RuntimeError, match="CUDA device"):
        runner.raw(x, 500, e)
    with pytest.raises(RuntimeError, match="no_grad"):
        runner.raw(x, 500, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_replayed_graph_gives_the_eager_output_for_new_inputs():
    unet = build_unet(TINY, "cuda")
    runner = GraphedRunner(unet)
    state = make_state(runner, make_inputs(TINY), "cuda", torch.float32)
    with torch.no_grad():
        for seed in (1, 2):  # the second call replays the graph captured by the first, on other inputs
            x = torch.randn(3, *TINY.latent, generator=torch.Generator().manual_seed(seed)).cuda()
            got = runner.guided(x, state.t, state.cond)
            want = UNetRunner(unet).guided(x, state.t, state.cond)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert runner.captures == 2  # batch 1 (the state's eps) and batch 3


def finite_ratios(section: dict) -> bool:
    ratios = section["ratios"]
    return bool(ratios) and all(isinstance(v, float) and math.isfinite(v) for v in ratios.values())


@pytest.mark.slow
def test_a_tiny_cpu_run_reports_every_section_and_a_finite_ratio_wherever_one_ran(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "service"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["model"]["shape"] == "tiny" and result["machine"]["device"].startswith("cpu")
    sections = result["sections"]
    assert list(sections) == list(SECTIONS)
    assert {n for n, s in sections.items() if s["status"] == "skipped"} == {"cuda_graphs", "compile"}
    assert "CUDA device" in sections["cuda_graphs"]["reason"]
    assert "--sections all" in sections["compile"]["reason"]
    for name, section in sections.items():
        if section["status"] == "ran" and name != "reference_loop":  # the loop is the baseline: no ratio of its own
            assert finite_ratios(section), (name, section.get("ratios"))
    assert sections["reference_loop"]["status"] == "ran" and sections["reference_loop"]["masks_per_s"] > 0
    assert [r["batch"] for r in sections["batched"]["rows"]] == result["plan"]["batches"]
    precision = sections["precision"]
    assert {k for k in precision["ratios"]} == {f"{d}_{m}_{f}" for d in ("float16", "bfloat16")
                                               for m in ("rise", "rise_mean", "cam") for f in ("rel_l2", "spearman")}
    service = sections["service"]["result"]
    assert set(service["jobs"]) == {"plain", "rise"} and "floor_target_met" in service
    assert (tmp_path / "gpu-service.json").exists()

    goals = {g["goal"]: g for g in result["goals"]}
    ran = [g for g in goals.values() if g["section"] in ("bare_unet", "batched", "service")]
    assert ran and all(isinstance(g["met"], bool) and math.isfinite(g["value_over_limit"]) for g in ran)
    assert goals["DF-RISE time over bare UNet, same batch (CUDA graphs)"]["met"] is None


def test_the_family_rows_build_sdxl_and_flux_shapes_with_their_published_parameter_counts():
    from bench.gpu_families import FLUX_DEV_PARAMETERS, SDXL_PARAMETERS, build, rows

    sdxl, flux = (build(r, torch.device("meta"), torch.bfloat16) for r in rows(tiny=False))
    assert parameter_count(sdxl) == SDXL_PARAMETERS and parameter_count(flux) == FLUX_DEV_PARAMETERS
    assert all(p.dtype == torch.bfloat16 for p in flux.parameters())
    assert flux.config.guidance_embeds and len(flux.single_transformer_blocks) == 38


def test_the_family_rows_time_every_explainer_of_a_tiny_sdxl_and_flux_step(one_thread):
    from bench.gpu import TINY_PLAN, WEIGHTS
    from bench.gpu_families import families_section

    env = gpu_sections.Env(torch.device("cpu"), torch.float32, TINY, make_inputs(TINY), TINY_PLAN,
                           gpu_sections.Budget(60.0, WEIGHTS))
    out = families_section(env, tiny=True)
    assert set(out["rows"]) == {"sdxl", "flux"}
    assert out["rows"]["flux"]["cam_layers"] == 3 and out["rows"]["flux"]["eps_finite"]
    assert set(out["ratios"]) == {f"{f}_{k}" for f in ("sdxl", "flux")
                                  for k in ("rise_per_mask_vs_denoise", "cam_vs_denoise", "attn_vs_denoise")}
    assert all(math.isfinite(v) and v > 0 for v in out["ratios"].values())
