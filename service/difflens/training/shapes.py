"""Train the shapes model from scratch on freshly rendered scenes and save it as a standard diffusers folder.

    python -m difflens.training.shapes --out models/shapes --steps 6000 --seed 0 --arch deep5 \
        --high-noise-share 0.5 --prediction v_prediction --terminal-alpha-bar 1e-5

Pixel-space UNet2DConditionModel + a small CLIP text encoder trained jointly; cosine noise schedule (1000 steps,
the squaredcos_cap_v2 curve stopped at a terminal alpha_bar, see build.cosine_betas), epsilon or v prediction, AdamW
(fused), EMA of the weights, 10% empty captions for classifier-free guidance, float32 (bf16 autocast is ~13x
slower on this CPU, which has no native bf16). Batch k is a pure function of (seed, k) and so is its noise, so a
run is reproducible from its seed and a resumed run continues exactly where the checkpoint left it. Checkpoints
(with optimizer and EMA state) go to --work every few minutes; a run finds its checkpoint there and resumes. At
the end the EMA weights are saved to --out with difflens.json (the scheduler and guidance the checker liked best)
and training.json (config, throughput, checker accuracy).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from difflens.training.build import (
    ArchConfig,
    build_components,
    count_parameters,
    resolve_arch,
    sampling_scheduler,
    save_model,
)
from difflens.training.data import BatchStream, DataConfig
from difflens.training.evaluate import defaults_from, evaluate, format_table, in_memory_model

log = logging.getLogger("difflens.training.shapes")
CHECKPOINT = "checkpoint.pt"
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the weights (with the architecture). `steps` None: train until --minutes."""

    seed: int = 0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 8e-4
    min_lr_ratio: float = 0.1  # cosine decay to this share of lr by `steps` (constant when steps is None)
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # The cosine curve stopped at SD's terminal alpha_bar; None: squaredcos_cap_v2 as is (ends at ~2e-9, where an
    # epsilon model cannot say anything about x0 and Euler / DPM-Solver start from sigma ~2e4).
    terminal_alpha_bar: float | None = 0.0047
    # Share of each batch whose timesteps are drawn from the noisier half of the schedule instead of all of it.
    # Where an object goes is decided there, and the epsilon loss at high noise hardly depends on x0, so uniform
    # draws give layout (the position words) little signal. 0 keeps plain uniform draws.
    high_noise_share: float = 0.0
    # "epsilon", or "v_prediction" (v = sqrt(a) eps - sqrt(1 - a) x0): at high noise its loss weighs errors in x0
    # about 1/a times more than epsilon's, and it stays defined at (near) zero terminal SNR, where epsilon is not.
    prediction_type: str = "epsilon"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.high_noise_share <= 1.0:
            raise ValueError(f"high_noise_share must be in [0, 1], got {self.high_noise_share}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")


class EMA:
    """Exponential moving average of parameters, with the usual warm-up (decay grows as (1 + n) / (10 + n))."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(v)
        self.updates = int(state["updates"])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant, or cosine down to min_lr_ratio * lr when the step count is known."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.steps is None:
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def training_target(prediction_type: str, images: torch.Tensor, noise: torch.Tensor,
                    alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for x_t = sqrt(a) x0 + sqrt(1 - a) eps: eps, or v = sqrt(a) eps - sqrt(1 - a) x0."""
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * images
    return noise


def step_generator(seed: int, step: int) -> torch.Generator:
    """The noise and timestep draw of one step, from (seed, step) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0]))


def fingerprint(arch: ArchConfig, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the whole configuration, the step budget included (the cosine
    learning-rate schedule spans it, so a run resumed under another budget is not the run of either)."""
    return {"arch": dataclasses.asdict(arch), "train": dataclasses.asdict(cfg)}


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two fingerprints differ: ['train.steps: 205 -> 210', ...]."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}{k}.")]
    return [] if a == b else [f"{path.rstrip('.')}: {a!r} -> {b!r}"]


class Trainer:
    """One training run: components, optimizer, EMA, checkpointing. `work`: checkpoint, log and tokenizer folder."""

    def __init__(self, arch: ArchConfig, cfg: TrainConfig, work: Path) -> None:
        self.arch, self.cfg, self.work = arch, cfg, work
        work.mkdir(parents=True, exist_ok=True)
        c = build_components(arch, work / "tokenizer", seed=cfg.seed, terminal_alpha_bar=cfg.terminal_alpha_bar,
                             prediction_type=cfg.prediction_type)
        self.unet, self.text_encoder = c["unet"], c["text_encoder"]
        self.tokenizer, self.noise_scheduler = c["tokenizer"], c["noise_scheduler"]
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.ema = EMA(self.params, cfg.ema_decay)
        self.step = 0
        self.alphas = self.noise_scheduler.alphas_cumprod.float()

    def resume(self) -> bool:
        """Load work/checkpoint.pt if it exists and was written by the same configuration."""
        f = self.work / CHECKPOINT
        if not f.exists():
            return False
        state = torch.load(f, weights_only=True)
        wanted = json.loads(json.dumps(fingerprint(self.arch, self.cfg)))
        if state["fingerprint"] != wanted:
            changed = "; ".join(_differences(state["fingerprint"], wanted))
            raise ValueError(f"{f} was written by a different configuration ({changed}); use another --work or "
                             "--fresh")
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        return True

    def checkpoint(self) -> None:
        state = {"step": self.step, "unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict(),
                 "opt": self.opt.state_dict(), "ema": self.ema.state_dict(),
                 "fingerprint": json.loads(json.dumps(fingerprint(self.arch, self.cfg)))}
        tmp = self.work / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.work / CHECKPOINT)  # atomic: a kill mid-write leaves the previous checkpoint

    def train_step(self, images: torch.Tensor, input_ids: torch.Tensor) -> float:
        """images: (B, 3, S, S) in [-1, 1]; input_ids: (B, L). One optimizer step; returns the loss."""
        g = step_generator(self.cfg.seed, self.step)
        noise = torch.randn(images.shape, generator=g)
        n_t = len(self.alphas)
        t = torch.randint(0, n_t, (images.shape[0],), generator=g)
        n_high = round(self.cfg.high_noise_share * images.shape[0])
        if n_high:
            t[:n_high] = torch.randint(n_t // 2, n_t, (n_high,), generator=g)
        a = self.alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        target = training_target(self.cfg.prediction_type, images, noise, a)
        enc = self.text_encoder(input_ids)[0]
        loss = F.mse_loss(self.unet(noisy, t, enc).sample, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.ema.update()
        self.step += 1
        return loss.item()

    def ema_modules(self) -> tuple[Any, Any]:
        """Copies of the UNet and text encoder carrying the EMA weights, in eval mode."""
        unet, te = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        with torch.no_grad():
            for p, s in zip(list(unet.parameters()) + list(te.parameters()), self.ema.shadow, strict=True):
                p.copy_(s)
        return unet.eval(), te.eval()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(trainer: Trainer, minutes: float, checkpoint_minutes: float, log_every: int = 50,
          render_thread: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """Run until cfg.steps, step `stop_at` (the LR schedule still runs to cfg.steps: this reproduces a run the
    clock stopped early) or `minutes` of wall clock, checkpointing on the way. Returns throughput figures."""
    cfg = trainer.cfg
    start_step, t0 = trainer.step, time.monotonic()
    deadline, next_ckpt = t0 + 60 * minutes, t0 + 60 * checkpoint_minutes
    window_t, window_steps, smooth = t0, 0, None
    trainer.unet.train()
    trainer.text_encoder.train()
    with (trainer.work / "log.jsonl").open("a") as logf, \
            BatchStream(cfg.seed, trainer.step, cfg.batch_size, cfg.data, trainer.tokenizer,
                        threaded=render_thread) as batches:
        for batch in batches:
            if (cfg.steps is not None and trainer.step >= cfg.steps) or time.monotonic() >= deadline \
                    or (stop_at is not None and trainer.step >= stop_at):
                break
            loss = trainer.train_step(batch.images, batch.input_ids)
            smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
            window_steps += 1
            now = time.monotonic()
            if trainer.step % log_every == 0:
                rec = {"step": trainer.step, "loss": round(smooth, 5), "lr": lr_at(trainer.step - 1, cfg),
                       "steps_per_s": round(window_steps / (now - window_t), 3),
                       "elapsed_min": round((now - t0) / 60, 2), "peak_rss_mb": round(peak_rss_mb())}
                log.info(" ".join(f"{k}={v}" for k, v in rec.items()))
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                window_t, window_steps = now, 0
            if now >= next_ckpt:
                trainer.checkpoint()
                next_ckpt = now + 60 * checkpoint_minutes
    trainer.checkpoint()
    elapsed = time.monotonic() - t0
    done = trainer.step - start_step
    return {"steps": trainer.step, "steps_this_run": done, "minutes_this_run": round(elapsed / 60, 2),
            "steps_per_s": round(done / elapsed, 3) if elapsed > 0 else None, "final_loss": smooth,
            "peak_rss_mb": round(peak_rss_mb())}


def finish(trainer: Trainer, out: Path, stats: dict[str, Any], eval_images: int, eval_held: int,
           guidances: list[float], eval_steps: int, schedulers: tuple[str, ...] = ("ddim", "ddpm")) -> Path:
    """Save the EMA model to `out`, judge it with the checker and record the best sampling set-up as default."""
    unet, te = trainer.ema_modules()
    result = None
    if eval_images > 0 or eval_held > 0:
        model = in_memory_model(unet, te, trainer.tokenizer, sampling_scheduler(trainer.noise_scheduler))
        result = evaluate(model, guidances, eval_steps, eval_images, eval_held, seed=trainer.cfg.seed,
                          schedulers=schedulers)
        log.info("checker accuracy of the EMA model:\n%s", format_table(result))
    defaults = defaults_from(result, trainer.arch.sample_size, eval_steps)
    record = {"arch": dataclasses.asdict(trainer.arch), "train": dataclasses.asdict(trainer.cfg), **stats,
              "parameters": count_parameters(unet, te), "evaluation": result}
    save_model(out, unet, te, trainer.tokenizer, trainer.noise_scheduler, defaults, record)
    mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    log.info("saved %s (%.1f MB, %d parameters, defaults %s)", out, mb, record["parameters"], defaults)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m difflens.training.shapes", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="model folder to write (diffusers layout)")
    p.add_argument("--work", type=Path, help="checkpoint / log folder (default out/train/<name of --out>)")
    p.add_argument("--minutes", type=float, default=80.0, help="wall-clock budget of the training loop")
    p.add_argument("--steps", type=int, help="total optimizer steps (fixes the LR schedule: reproducible)")
    p.add_argument("--stop-at-step", type=int,
                   help="stop at this step though --steps sets the LR schedule (reproduces a run the clock cut)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="deep4", help="preset name or JSON file of ArchConfig fields")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--high-noise-share", type=float, default=0.0,
                   help="share of each batch with timesteps from the noisier half of the schedule")
    p.add_argument("--prediction", default="epsilon", choices=PREDICTION_TYPES,
                   help="what the UNet predicts (the scheduler config records it)")
    p.add_argument("--two-object-prob", type=float, default=0.2)
    p.add_argument("--terminal-alpha-bar", type=float, default=0.0047,
                   help="stop the cosine schedule at this alpha_bar (0: plain squaredcos_cap_v2, ~2e-9)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--fresh", action="store_true", help="ignore (and overwrite) a checkpoint and log in --work")
    p.add_argument("--eval-images", type=int, default=48, help="training-caption images per set-up (0: skip)")
    p.add_argument("--eval-held-out", type=int, default=32, help="held-out-caption images per set-up")
    p.add_argument("--eval-guidance", default="1,1.5,2,3")
    p.add_argument("--eval-schedulers", default="ddim,ddpm")
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--render-thread", action="store_true",
                   help="render batches in a background thread (only helps with a spare core)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(a.threads)
    arch = resolve_arch(a.arch)
    if a.stop_at_step is not None and a.stop_at_step < 1:
        log.error("--stop-at-step: got %d; must be >= 1", a.stop_at_step)
        return 2
    try:
        cfg = TrainConfig(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                          terminal_alpha_bar=a.terminal_alpha_bar or None, high_noise_share=a.high_noise_share,
                          prediction_type=a.prediction,
                          data=DataConfig(size=arch.sample_size, two_object_prob=a.two_object_prob))
    except ValueError as e:
        log.error("--high-noise-share: %s", e)  # the only TrainConfig field argparse does not already check
        return 2
    work = a.work or Path("out/train") / a.out.name
    trainer = Trainer(arch, cfg, work)
    if a.fresh:
        (work / "log.jsonl").unlink(missing_ok=True)
    else:
        try:
            if trainer.resume():
                log.info("resumed from %s at step %d", work / CHECKPOINT, trainer.step)
                if cfg.steps is not None and trainer.step >= cfg.steps:  # a finished run: keep what it wrote
                    log.info("%s holds a finished run (step %d of %d): nothing to train, %s left as it is; "
                             "--fresh (or another --work) trains again from scratch", work, trainer.step,
                             cfg.steps, a.out)
                    return 0
        except ValueError as e:
            log.error("%s", e)
            return 2
    log.info("arch %s: %d parameters; batch %d, lr %g, threads %d", a.arch,
             count_parameters(trainer.unet, trainer.text_encoder), cfg.batch_size, cfg.lr, a.threads)
    stats = train(trainer, a.minutes, a.checkpoint_minutes, a.log_every, a.render_thread, a.stop_at_step)
    log.info("trained: %s", stats)
    finish(trainer, a.out, stats, a.eval_images, a.eval_held_out, [float(g) for g in a.eval_guidance.split(",")],
           a.eval_steps, tuple(a.eval_schedulers.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
