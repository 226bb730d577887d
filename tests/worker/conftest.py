from __future__ import annotations

import pytest

from tests.worker.helpers import MODEL, settings


@pytest.fixture
def worker_settings(tiny_dir):
    return settings(tiny_dir)


@pytest.fixture
def make_worker(tiny_model):
    """make_worker(settings, queue, name=None, models=(MODEL,)) -> a started Worker serving the session's tiny model
    under the names `models` (and those of `settings`); stopped at the end."""
    from difflens.models import ModelRegistry
    from difflens.worker import Worker

    started = []

    def make(settings, queue, name=None, models=(MODEL,)):
        registry = ModelRegistry(settings, preloaded=dict.fromkeys(models, tiny_model))
        w = Worker(settings, queue, registry, name=name)
        w.start()
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop(timeout=120)


@pytest.fixture
def memory_queue(worker_settings):
    from difflens.queue.memory import InProcessQueue

    q = InProcessQueue(worker_settings)
    yield q
    q.close()
