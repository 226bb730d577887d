"""Invalid requests: INVALID_ARGUMENT naming the request field and what is allowed, and nothing queued.

The server here has no worker, so any job that got queued would still be waiting: queue depth 0 proves none was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from difflens.api.pb import pb
from tests.api.helpers import CAM_LAYERS, MODEL, settings

LONG = " ".join(["red"] * 80)  # 80 tokens > 75


def base() -> Any:
    req = pb.ExplainRequest(model="tiny", prompt="a red circle", steps=4)
    req.explain.rise.masks = 8
    return req


def edit(**fields: Any) -> Callable[[Any], None]:
    def apply(req: Any) -> None:
        for k, v in fields.items():
            setattr(req, k, v)
    return apply


def _set(path: str, value: Any) -> Callable[[Any], None]:
    def apply(req: Any) -> None:
        *parents, leaf = path.split(".")
        msg = req
        for p in parents:
            msg = getattr(msg, p)
        if isinstance(value, list):
            getattr(msg, leaf).extend(value)
        else:
            setattr(msg, leaf, value)
    return apply


def _explicit(values: list[int]) -> Callable[[Any], None]:
    def apply(req: Any) -> None:
        req.ClearField("steps")
        req.sampling.explicit.SetInParent()
        req.sampling.explicit.timesteps.extend(values)
    return apply


def _all_false(req: Any) -> None:
    req.explain.steps.all = False


def _indices(values: list[int]) -> Callable[[Any], None]:
    def apply(req: Any) -> None:
        req.explain.steps.indices.SetInParent()
        req.explain.steps.indices.values.extend(values)
    return apply


def _cam(layers: list[str], target: int = 0) -> Callable[[Any], None]:
    def apply(req: Any) -> None:
        req.explain.cam.SetInParent()
        req.explain.cam.layers.extend(layers)
        req.explain.cam.target = target
    return apply


def _stage(stage: int, shift: float | None = None, steps: int = 4) -> Callable[[Any], None]:
    def apply(req: Any) -> None:
        req.steps = steps
        req.sampling.exponential.stage = stage
        if shift is not None:
            req.sampling.exponential.shift = shift
    return apply


CASES: list[tuple[str, Callable[[Any], None], str]] = [
    ("unknown model", edit(model="nope"), "model"),
    ("prompt too long", edit(prompt=LONG), "prompt"),
    ("negative prompt too long", edit(negative_prompt=LONG), "negative_prompt"),
    ("negative seed", edit(seed=-1), "seed"),
    ("zero steps", edit(steps=0), "steps"),
    ("steps over the limit", edit(steps=201), "steps"),
    ("steps over T", edit(steps=5000), "steps"),
    ("negative guidance", edit(guidance_scale=-1.0), "guidance_scale"),
    ("huge guidance", edit(guidance_scale=51.0), "guidance_scale"),
    ("width not a multiple", edit(width=40), "width"),
    ("height below the multiple", edit(height=8), "height"),
    ("width over max side", edit(width=2048), "width"),
    ("unknown scheduler", edit(scheduler=99), "scheduler"),
    ("exponential without stage", _stage(0), "sampling.exponential.stage"),
    ("negative shift", _stage(1, -1.0), "sampling.exponential.shift"),
    ("shift too small to be strictly decreasing", _stage(2, 0.0, steps=150), "sampling.exponential.shift"),
    ("explicit empty", _explicit([]), "sampling.explicit.timesteps"),
    ("explicit not decreasing", _explicit([500, 600]), "sampling.explicit.timesteps"),
    ("explicit out of range", _explicit([1000, 10]), "sampling.explicit.timesteps"),
    ("explicit too many", _explicit(list(range(999, 999 - 201, -1))), "sampling.explicit.timesteps"),
    # found by test_fuzz: the whole list was read, then repeated in the message past its 1 KiB
    ("explicit, 100,000 of them", _explicit([-1] * 100_000), "sampling.explicit.timesteps"),
    ("explicit, 190 out of range", _explicit([10**9] * 190), "sampling.explicit.timesteps"),
    ("step index out of range", _indices([0, 9]), "explain.steps.indices.values"),
    ("empty step index list", _indices([]), "explain.steps.indices.values"),
    ("every zero", _set("explain.steps.every", 0), "explain.steps.every"),
    ("all set to false", _all_false, "explain.steps.all"),
    ("zero masks", _set("explain.rise.masks", 0), "explain.rise.masks"),
    ("masks over the limit", _set("explain.rise.masks", 10_000), "explain.rise.masks"),
    ("masks x steps over budget", lambda r: (_set("explain.rise.masks", 8000)(r), edit(steps=30)(r)),
     "explain.rise.masks"),
    ("p zero", _set("explain.rise.p", 0.0), "explain.rise.p"),
    ("p above one", _set("explain.rise.p", 1.5), "explain.rise.p"),
    ("batch zero", _set("explain.rise.batch", 0), "explain.rise.batch"),
    ("batch over the limit", _set("explain.rise.batch", 2000), "explain.rise.batch"),
    ("grid size zero", _set("explain.rise.grid_size", 0), "explain.rise.grid_size"),
    ("grid finer than the latent", lambda r: (_set("explain.rise.mask_kind", 2)(r),
                                               _set("explain.rise.grid_size", 64)(r)), "explain.rise.grid_size"),
    ("negative mask seed", _set("explain.rise.mask_seed", -5), "explain.rise.mask_seed"),
    ("unknown mask kind", _set("explain.rise.mask_kind", 7), "explain.rise.mask_kind"),
    ("unknown score", _set("explain.rise.score", 9), "explain.rise.score"),
    ("unknown rise target", _set("explain.rise.target", 5), "explain.rise.target"),
    ("unknown substrate", _set("explain.rise.substrate", 4), "explain.rise.substrate"),
    ("unknown ssim padding", _set("explain.rise.ssim_padding", 7), "explain.rise.ssim_padding"),
    ("unknown cam layer", _cam([CAM_LAYERS[0], "up_blocks.9.resnets.0"]), "explain.cam.layers"),
    ("unknown cam target", _cam([], target=8), "explain.cam.target"),
    # Long values the message repeats are cut, so that what is allowed still fits its 1 KiB (found by test_fuzz)
    ("unknown model, 100 kB of it", edit(model="m" * 100_000), "model"),
    ("unknown cam layers, many and long", _cam(["x" * 5000] * 12), "explain.cam.layers"),
    ("unknown map dtype", _set("output.map_dtype", 5), "output.map_dtype"),
    ("idempotency key too long", edit(idempotency_key="k" * 300), "idempotency_key"),
    # 1024 px, every CAM layer, 60 attention maps, x0 previews, float32: ~78 MiB per explained step, over 64 MiB
    ("step event over the message limit", lambda r: (
        edit(prompt=" ".join(["red"] * 60), width=1024, height=1024)(r), _cam([])(r),
        r.explain.attention.SetInParent(), _set("explain.attention.enabled", True)(r),
        _set("output.include_x0_previews", True)(r)), "explain"),
    ("zero timeout", edit(timeout_seconds=0.0), "timeout_seconds"),
    ("negative timeout", edit(timeout_seconds=-3.0), "timeout_seconds"),
]


@pytest.fixture(scope="module")
def front(tiny_dir):
    from difflens.api.server import BackgroundServer
    from difflens.client import DifflensClient

    with BackgroundServer(settings(tiny_dir)) as srv, DifflensClient(srv.target) as client:
        yield srv, client


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)


def refused(client: Any, change: Callable[[Any], None]) -> tuple[Any, str]:
    """Submit the base request with `change` applied; it must be INVALID_ARGUMENT. -> (request, details)."""
    req = base()
    change(req)
    with pytest.raises(grpc.RpcError) as err:
        client.submit(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return req, err.value.details()


@pytest.mark.parametrize(("name", "change", "field"), CASES, ids=[c[0] for c in CASES])
def test_invalid_submit_names_the_field_and_queues_nothing(front, name, change, field):
    srv, client = front
    req, details = refused(client, change)
    assert details.startswith(f"{field}: "), details
    assert any(w in details for w in ("allowed", "must", "expected", "available", "needs")), details
    assert srv.server.queue.depth(MODEL) == srv.server.queue.depth(req.model) == 0  # nor under a bad name


# Values past both the engine's own ranges and this deployment's tighter Limits: the error names the deployment's.
PAST_BOTH = [
    (edit(steps=5000), "steps", "range [1, 200]"),
    (edit(width=5000), "width", ", 1024]"),
    (_set("explain.rise.masks", 2_000_000), "explain.rise.masks", "range [1, 8192]"),
    (_set("explain.rise.batch", 5000), "explain.rise.batch", "range [1, 1024]"),
    (lambda r: (_set("explain.rise.mask_kind", 2)(r), _set("explain.rise.grid_size", 2000)(r)),
     "explain.rise.grid_size", "range [1, 16]"),
]


@pytest.mark.parametrize(("change", "field", "allowed"), PAST_BOTH, ids=[c[1] for c in PAST_BOTH])
def test_a_value_past_every_limit_is_told_the_deployment_s_range(front, change, field, allowed):
    _, details = refused(front[1], change)
    assert details.startswith(f"{field}: ") and allowed in details, details


def test_steps_are_ignored_with_explicit_timesteps(front):
    """The contract ignores `steps` when the timesteps are explicit, so it is not range-checked there either."""
    srv, client = front
    req = base()
    _explicit([999, 500, 1])(req)
    req.steps = 5000
    record = client.submit(req)
    assert record.state == "queued"
    assert client.cancel(record.id).state == "cancelled" and srv.server.queue.depth(MODEL) == 0


@pytest.mark.parametrize("name", ["unknown model", "masks x steps over budget", "explicit not decreasing"])
def test_invalid_explain_fails_before_streaming(front, name):
    srv, client = front
    _, change, field = next(c for c in CASES if c[0] == name)
    req = base()
    change(req)
    stream = client.explain(req, raw=True)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")
    assert stream.events == [] and srv.server.queue.depth(MODEL) == 0


def test_a_valid_request_is_queued(front):
    """The control: the same base request, unchanged, is accepted (and waits: there is no worker). Cancelled
    while queued, it ends at the front and is counted there."""
    from difflens import metrics

    def cancelled() -> float:
        return metrics.REGISTRY.get_sample_value("difflens_jobs_total", {"status": "cancelled"}) or 0.0

    srv, client = front
    record = client.submit(base())
    assert record.state == "queued" and srv.server.queue.depth(MODEL) == 1
    before = cancelled()
    assert client.cancel(record.id).state == "cancelled" and srv.server.queue.depth(MODEL) == 0
    assert cancelled() == before + 1
