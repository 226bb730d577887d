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


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny random-weights SDXL model (StableDiffusionXLPipeline layout), written once per session."""
    from difflens.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir):
    from difflens.engine.loading import load_model

    return load_model(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """The tiny random-weights SD3 model (StableDiffusion3Pipeline layout, with T5), written once per session."""
    from difflens.engine.tiny_sd3 import write_tiny_sd3

    return write_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_dir):
    from difflens.engine.loading import load_model

    return load_model(tiny_sd3_dir)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """The tiny random-weights FLUX.1-dev-like model (FluxPipeline layout, guidance embedding), once per session."""
    from difflens.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux", family="flux")


@pytest.fixture(scope="session")
def tiny_flux(tiny_flux_dir):
    from difflens.engine.loading import load_model

    return load_model(tiny_flux_dir)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    """The tiny FLUX.1-schnell-like model: no guidance input, a fixed shift."""
    from difflens.engine.loading import load_model
    from difflens.engine.tiny import make_tiny_model

    return load_model(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", family="flux-schnell"))


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis (REDIS_URL, else a private server); tests isolate themselves with their own queue name."""
    from tests.support.redis_server import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture
def queue_name(request):
    """A queue (stream key prefix) no other test uses."""
    import uuid

    return f"test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
