from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def triton_server(tiny_dir):
    """`difflens triton-serve` of the session's tiny model as Triton model "tiny", max_batch_size 4 (so DF-RISE's
    calls are split), started once per test module (about 7 s); skipped without `make triton-venv`."""
    from tests.support.triton_server import TritonServer

    server = TritonServer(tiny_dir)
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def triton_settings(triton_server):
    """Engine settings of the triton backend on that server (float32, no start-up wait)."""
    from difflens.config import Settings

    return Settings(unet_backend="triton", triton_url=triton_server.url, triton_models=(("", "tiny"),),
                    triton_wait_s=0.0)
