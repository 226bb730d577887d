from __future__ import annotations

import pytest

from tests.api.helpers import MODEL, settings


@pytest.fixture(scope="module")
def embedded(tiny_dir, tiny_model):
    """A real gRPC front on 127.0.0.1 (free port) with one worker in-process on the in-process queue: what
    `difflens serve --embedded` runs, with the session's tiny model preloaded."""
    from difflens.api.server import BackgroundServer
    from difflens.models import ModelRegistry

    s = settings(tiny_dir)
    with BackgroundServer(s, run_worker=True, registry=ModelRegistry(s, preloaded={MODEL: tiny_model})) as srv:
        yield srv


@pytest.fixture
def client(embedded):
    from difflens.client import DifflensClient

    with DifflensClient(embedded.target, caller="tests") as c:
        yield c
