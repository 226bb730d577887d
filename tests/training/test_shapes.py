from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflens.engine.loading import load_model
from difflens.engine.options import GenerationParams
from difflens.engine.sampler import generate
from difflens.training.shapes import TrainConfig, lr_at, main

from .conftest import TINY, make_trainer


def test_smoke_run_trains_and_logs(smoke):
    trainer, stats, _ = smoke
    assert trainer.step == stats["steps"] == 20
    log = [json.loads(line) for line in (trainer.work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20]
    assert all(np.isfinite(r["loss"]) and r["steps_per_s"] > 0 for r in log)
    assert (trainer.work / "checkpoint.pt").exists()


def test_saved_folder_loads_with_the_standard_loader_and_generates(smoke):
    _, _, out = smoke
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert not list(out.rglob("*.bin")) and list((out / "unet").glob("*.safetensors"))
    m = load_model(out)
    assert m.vae is None and m.default_size == (32, 32)
    defaults = json.loads((out / "difflens.json").read_text())
    best = json.loads((out / "training.json").read_text())["evaluation"]["best"]
    assert m.defaults.guidance_scale == defaults["guidance_scale"] == best["guidance"]
    assert (m.defaults.steps, m.defaults.scheduler) == (3, best["scheduler"])
    assert m.defaults.max_side == 4 * 32
    assert m.scheduler.config.clip_sample and m.scheduler.config.prediction_type == "epsilon"
    assert float(m.scheduler.alphas_cumprod[-1]) == pytest.approx(0.0047, rel=1e-3)
    for scheduler in ("ddim", "ddpm", "euler", "dpmsolver++"):
        g = generate(m, GenerationParams("a large red striped circle on the left", seed=1, scheduler=scheduler))
        assert g.image.shape == (32, 32, 3) and np.isfinite(g.image).all()
        assert len(g.timesteps) == 3


def test_record_holds_config_throughput_and_checker_accuracy(smoke):
    _, _, out = smoke
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 20 and record["parameters"] > 0 and record["peak_rss_mb"] > 0
    ev = record["evaluation"]
    assert ev["images"] == {"train": 3, "held_out": 2}
    assert {(r["scheduler"], r["guidance"]) for r in ev["runs"]} == {(s, g) for s in ("ddim", "ddpm") for g in (1, 2)}
    assert all(0 <= r["mean"] <= 1 and set(r["train"]) == set(r["held_out"]) for r in ev["runs"])


def test_saved_weights_are_the_ema_weights(smoke):
    trainer, _, out = smoke
    m = load_model(out)
    saved = list(m.unet.parameters()) + list(m.text_encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(saved, trainer.ema.shadow, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(saved, trainer.params, strict=True))


def test_a_checkpoint_is_not_resumed_under_another_step_budget(tmp_path):
    """The cosine schedule spans --steps: 3 steps then 3 more under a budget of 6 would be neither run (past the
    warm-up their learning rates differ), so the resume is refused, naming what changed."""
    from difflens.training.shapes import lr_at, train

    short = TrainConfig(**{**TINY.__dict__, "steps": 8, "warmup": 2})
    longer = TrainConfig(**{**TINY.__dict__, "steps": 12, "warmup": 2})
    assert lr_at(4, short) != lr_at(4, longer)
    train(make_trainer(tmp_path, short), minutes=5, checkpoint_minutes=5, stop_at=4)
    with pytest.raises(ValueError, match=r"different configuration \(train\.steps: 8 -> 12\)"):
        make_trainer(tmp_path, longer).resume()
    again = make_trainer(tmp_path, short)
    assert again.resume() and again.step == 4


def test_a_run_stopped_at_a_step_resumes_to_the_uninterrupted_weights(tmp_path):
    """--stop-at-step keeps the LR schedule of --steps (what a clock-cut run did), and the high-noise timestep
    draws are as reproducible as the rest."""
    from difflens.training.shapes import train

    cfg = TrainConfig(**{**TINY.__dict__, "steps": 6, "high_noise_share": 0.5})
    straight = make_trainer(tmp_path / "a", cfg)
    train(straight, minutes=5, checkpoint_minutes=5)
    cut = make_trainer(tmp_path / "b", cfg)
    assert train(cut, minutes=5, checkpoint_minutes=5, stop_at=3)["steps"] == 3
    rest = make_trainer(tmp_path / "b", cfg)
    assert rest.resume() and rest.step == 3
    train(rest, minutes=5, checkpoint_minutes=5)
    for a, b in zip(straight.params, rest.params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_high_noise_share_must_be_a_share():
    with pytest.raises(ValueError, match="high_noise_share"):
        TrainConfig(high_noise_share=1.5)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    from difflens.training.shapes import train

    t = make_trainer(tmp_path, TrainConfig(**{**TINY.__dict__, "steps": 1}))
    train(t, minutes=5, checkpoint_minutes=5)
    other = make_trainer(tmp_path, TrainConfig(**{**TINY.__dict__, "lr": 1e-3}))
    with pytest.raises(ValueError, match="different configuration"):
        other.resume()


def test_cosine_schedule_stops_at_the_terminal_alpha_bar():
    import math

    from difflens.training.build import build_noise_scheduler, cosine_betas

    plain = build_noise_scheduler(None).alphas_cumprod
    stopped = build_noise_scheduler(0.0047).alphas_cumprod
    assert float(plain[-1]) < 1e-8 and float(stopped[-1]) == pytest.approx(0.0047, rel=1e-4)
    assert float(stopped[0]) == pytest.approx(float(plain[0]), abs=1e-5)
    assert (stopped[1:] < stopped[:-1]).all() and (stopped >= plain - 1e-6).all()
    betas = cosine_betas(1000, 0.0047)
    assert math.prod(1 - b for b in betas) == pytest.approx(0.0047, rel=1e-6)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3) and lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, TrainConfig(lr=1e-3, warmup=10, steps=None)) == 1e-3


def test_command_line_writes_a_loadable_model(tmp_path):
    out = tmp_path / "m"
    argv = ["--out", str(out), "--work", str(tmp_path / "w"), "--arch", "tiny", "--steps", "2", "--batch-size", "2",
            "--threads", "1", "--eval-images", "0", "--eval-held-out", "0", "--eval-steps", "2"]
    assert main(argv) == 0
    m = load_model(out)
    assert (m.defaults.steps, m.defaults.guidance_scale, m.defaults.scheduler) == (2, 1.5, "ddpm")
    assert generate(m, GenerationParams("a small blue square at the top", seed=0)).image.shape == (32, 32, 3)
    # Run again (`make train-shapes` twice): the finished checkpoint is not "resumed" into a record of a run
    # that trained nothing; the model and its training.json stay as they were.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(argv) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("flag,value", [("--high-noise-share", "1.5"), ("--stop-at-step", "0")])
def test_bad_training_flags_are_refused_by_name_before_anything_is_written(tmp_path, caplog, flag, value):
    rc = main(["--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--arch", "tiny", flag, value])
    assert rc == 2 and flag in caplog.text
    assert not (tmp_path / "m").exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_is_what_the_sampler_inverts(tmp_path, prediction_type):
    """The target the UNet learns, fed to the engine's x0 formula for the saved scheduler, gives back the image."""
    from difflens.engine.sampler import predict_x0
    from difflens.training.build import build_noise_scheduler, sampling_scheduler
    from difflens.training.shapes import training_target

    sched = sampling_scheduler(build_noise_scheduler(1e-5, prediction_type))
    assert sched.config.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    images, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    for t in (0, 500, 999):
        a = sched.alphas_cumprod[t].double()
        noisy = a.sqrt() * images.double() + (1 - a).sqrt() * noise.double()
        target = training_target(prediction_type, images.double(), noise.double(), a)
        torch.testing.assert_close(predict_x0(sched, noisy, target, t), images.double(), atol=1e-6, rtol=0)


def test_a_v_prediction_run_saves_a_v_prediction_scheduler(tmp_path):
    from difflens.training.shapes import train

    t = make_trainer(tmp_path, TrainConfig(**{**TINY.__dict__, "steps": 3, "prediction_type": "v_prediction"}))
    assert t.noise_scheduler.config.prediction_type == "v_prediction"
    stats = train(t, minutes=5, checkpoint_minutes=5)
    assert stats["steps"] == 3 and np.isfinite(stats["final_loss"])
    from difflens.training.build import save_model

    unet, te = t.ema_modules()
    out = save_model(tmp_path / "model", unet, te, t.tokenizer, t.noise_scheduler, {"steps": 4})
    model = load_model(out)
    assert model.scheduler.config.prediction_type == "v_prediction"
    assert np.isfinite(generate(model, GenerationParams("a red circle", seed=0)).image).all()
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction, got 'x0'"):
        TrainConfig(prediction_type="x0")
