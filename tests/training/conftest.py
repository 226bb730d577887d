from __future__ import annotations

import pytest

from difflens.training.build import ARCHS
from difflens.training.data import DataConfig
from difflens.training.shapes import TrainConfig, Trainer

TINY = TrainConfig(seed=0, steps=20, batch_size=4, warmup=5, data=DataConfig(two_object_prob=0.2))


def make_trainer(work, cfg: TrainConfig = TINY) -> Trainer:
    return Trainer(ARCHS["tiny"], cfg, work)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """A tiny model trained 20 steps and saved through the trainer's own path: (trainer, stats, model folder)."""
    from difflens.training.shapes import finish, train

    root = tmp_path_factory.mktemp("shapes")
    trainer = make_trainer(root / "work")
    stats = train(trainer, minutes=5, checkpoint_minutes=5, log_every=10)
    out = finish(trainer, root / "model", stats, eval_images=3, eval_held=2, guidances=[1.0, 2.0], eval_steps=3)
    return trainer, stats, out
