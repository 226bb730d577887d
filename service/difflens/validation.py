"""Request validation at the front: a JobSpec against the service Limits and the model catalog, before anything is
queued. Every error is InvalidArgument naming the (domain) field and what is allowed; api/ renames fields to the
contract's paths. Values that need no model were already checked when the option dataclasses were built; this adds
the checks that need the model (without its weights) and the deployment's limits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from difflens.catalog import CatalogModel, ModelCatalog
from difflens.config import Limits
from difflens.engine.options import GenerationParams, check_range
from difflens.engine.schedule import check_timesteps, exponential_timesteps
from difflens.engine.validate import resolve_generation
from difflens.errors import InvalidArgument
from difflens.jobs import JobSpec

if TYPE_CHECKING:
    from difflens.engine.loading import Model


def num_steps(params: GenerationParams, entry: CatalogModel) -> int:
    """How many denoising steps the (resolved) request runs; checks its timestep schedule like the engine will."""
    s = params.sampling
    if s.kind == "explicit":
        return len(check_timesteps(s.timesteps or (), entry.num_train_timesteps))
    n = int(params.steps or 0)
    if s.kind in ("early", "late"):
        exponential_timesteps(s.kind, n, s.shift, entry.num_train_timesteps)  # type: ignore[arg-type]
    return n


def check_given_limits(values: Mapping[str, float | None], limits: Limits) -> None:
    """The deployment's ranges of the counts a request gives ("steps", "rise.num_masks", "rise.batch_size"; None:
    not given). The front checks them on the raw request before the option dataclasses apply their wider,
    engine-wide ranges, so that an error names the range this deployment allows."""
    for field, top in (("steps", limits.max_steps), ("rise.num_masks", limits.max_masks),
                       ("rise.batch_size", limits.max_rise_batch)):
        value = values.get(field)
        if value is not None:
            check_range(field, value, 1, top)


def check_prompt(field: str, text: str, entry: CatalogModel, limits: Limits) -> None:
    allowed = min(limits.max_prompt_tokens, entry.max_prompt_tokens)
    n = entry.prompt_token_count(text)
    if n > allowed:
        raise InvalidArgument(field, f"{n} tokens; allowed at most {allowed} for model {entry.name!r}")


def check_layers(layers: tuple[str, ...], entry: CatalogModel, limits: Limits) -> None:
    known = set(entry.cam_layers)
    bad = [p for p in layers if p not in known]
    if bad:
        raise InvalidArgument("cam.layers", f"unknown layer path(s) {', '.join(map(repr, bad))}; allowed: "
                                            f"{', '.join(entry.cam_layers)}")
    count = len(set(layers)) if layers else len(entry.cam_layers)
    if count > limits.max_cam_layers:
        raise InvalidArgument("cam.layers", f"{count} layers; allowed at most {limits.max_cam_layers}")


def validate(spec: JobSpec, catalog: ModelCatalog, limits: Limits) -> JobSpec:
    """Check `spec` and return it with the model name resolved ('' -> the default). Raises InvalidArgument."""
    entry = catalog.get(spec.model)
    if len(spec.idempotency_key) > limits.max_idempotency_key:
        raise InvalidArgument("idempotency_key", f"{len(spec.idempotency_key)} characters; allowed at most "
                                                 f"{limits.max_idempotency_key}")
    params = spec.params
    check_prompt("prompt", params.prompt, entry, limits)
    check_prompt("negative_prompt", params.negative_prompt, entry, limits)
    # The engine's own resolution: defaults filled, size multiples, scheduler, steps within T. It reads only the
    # geometry attributes CatalogModel shares with a loaded Model.
    resolved = resolve_generation(cast("Model", entry), params, max_side=limits.max_side,
                                  max_steps=limits.max_steps)
    n = num_steps(resolved, entry)
    if resolved.sampling.kind == "explicit":
        check_range("sampling.timesteps", n, 1, limits.max_steps)
    explained = spec.explain.steps.select(n)
    rise = spec.explain.rise
    if rise is not None:
        check_given_limits({"rise.num_masks": rise.num_masks, "rise.batch_size": rise.batch_size}, limits)
        work = rise.num_masks * len(explained)
        if work > limits.max_mask_steps:
            raise InvalidArgument("rise.num_masks", f"{rise.num_masks} masks x {len(explained)} explained steps = "
                                                    f"{work}; allowed at most {limits.max_mask_steps} (fewer masks "
                                                    "or explained steps)")
        latent = min(int(resolved.width or 0), int(resolved.height or 0)) // entry.vae_scale_factor
        if rise.mask == "grid":
            check_range("rise.grid_size", rise.grid_size, 1, latent)
    if spec.explain.cam is not None:
        check_layers(spec.explain.cam.layers, entry, limits)
    return dataclasses.replace(spec, model=entry.name)
