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


@pytest.fixture
def serve_preloaded():
    """start(model, queue, settings, name) -> a started Worker serving the loaded `model` as MODEL (the family tests'
    tiny SDXL, SD3, FLUX models); stopped at the end."""
    from difflens.models import ModelRegistry
    from difflens.worker import Worker

    started = []

    def start(model, queue, s, name):
        w = Worker(s, queue, ModelRegistry(s, preloaded={MODEL: model}), name=name)
        w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(timeout=120)


@pytest.fixture
def family_queue():
    """make(model_dir) -> (InProcessQueue, settings) serving that folder as MODEL; closed at the end."""
    from difflens.queue.memory import InProcessQueue

    made = []

    def make(model_dir):
        s = settings(model_dir)
        made.append(InProcessQueue(s))
        return made[-1], s

    yield make
    for q in made:
        q.close()
