from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random-weights SD-format model, written once per session with `make_tiny_model`."""
    from difflens.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from difflens.engine.loading import load_model

    return load_model(tiny_dir)
