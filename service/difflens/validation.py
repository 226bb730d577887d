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
from difflens.engine.tokens import prompt_tokens
from difflens.engine.validate import resolve_generation
from difflens.errors import InvalidArgument, shown
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


# A request's lists -> the Limits attribute bounding their length (each step or layer once fits; duplicates are
# ignored, but count).
LIST_LIMITS = {"explain.steps.indices": "max_steps", "sampling.timesteps": "max_steps", "cam.layers": "max_cam_layers"}


def check_request_limits(limits: Limits, counts: Mapping[str, float | None], lengths: Mapping[str, int]) -> None:
    """The deployment's limits on a raw request, before its option dataclasses are built: the counts it gives, as
    check_given_limits, then the lengths of its lists (LIST_LIMITS' fields). Lists are bounded before they are
    read: 3,000,000 copies of step index 0 passed, and the audit record held them twice, so the Completed event
    passed the message limit and could never be delivered."""
    check_given_limits(counts, limits)
    for field, n in lengths.items():
        most = getattr(limits, LIST_LIMITS[field])
        if n > most:
            raise InvalidArgument(field, f"{n} values; allowed at most {most} (each once)")


# A prompt longer than this many characters per allowed token, whitespace runs counted as one (the tokenizer
# collapses them), is refused before it is tokenized: the front validates on its event loop, and tokenizing an
# 8 MB prompt held every other call for 7 s. Past 16 times that, the characters are not even counted.
PROMPT_CHARS_PER_TOKEN = 64


def check_prompt(field: str, text: str, entry: CatalogModel, limits: Limits) -> None:
    allowed = min(limits.max_prompt_tokens, entry.max_prompt_tokens)
    most = allowed * PROMPT_CHARS_PER_TOKEN
    if len(text) > most:
        size = len(text) if len(text) > 16 * most else len(" ".join(text.split()))
        if size > most:
            raise InvalidArgument(field, f"{size} characters, whitespace runs counted as one; allowed at most "
                                         f"{most} ({allowed} tokens) for model {entry.name!r}")
    n = entry.prompt_token_count(text)
    if n > allowed:
        raise InvalidArgument(field, f"{n} tokens; allowed at most {allowed} for model {entry.name!r}")


def check_layers(layers: tuple[str, ...], entry: CatalogModel, limits: Limits) -> None:
    known = set(entry.cam_layers)
    bad = [p for p in layers if p not in known]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""  # the allowed list must still fit the message
        raise InvalidArgument("cam.layers", f"unknown layer path(s) {', '.join(map(shown, bad[:3]))}{more}; "
                                            f"allowed: {', '.join(entry.cam_layers)}")
    count = len(set(layers)) if layers else len(entry.cam_layers)
    if count > limits.max_cam_layers:
        raise InvalidArgument("cam.layers", f"{count} layers; allowed at most {limits.max_cam_layers}")


# What a Step event carries besides its tensors' bytes (names, shapes, token words, the message framing), with room.
EVENT_OVERHEAD_BYTES = 256 * 1024


def step_event_bytes(spec: JobSpec, width: int, height: int, entry: CatalogModel) -> tuple[int, str]:
    """The size of one explained step's event on the wire, and what makes it up (for the error that refuses it):
    every map is (h, w) at latent size - DF-RISE's three, DF-CAM's sum and one per layer, one per prompt word for
    attention - plus the x0 preview (3, H, W), all in the request's map dtype."""
    f = entry.vae_scale_factor
    h, w, item = height // f, width // f, 2 if spec.output.map_dtype == "float16" else 4
    parts, maps = [], 0
    if spec.explain.rise is not None:
        maps += 3
        parts.append("3 DF-RISE maps")
    if spec.explain.cam is not None:
        layers = len(set(spec.explain.cam.layers)) or len(entry.cam_layers)
        maps += 1 + layers
        parts.append(f"{1 + layers} DF-CAM maps ({layers} layers)")
    if spec.explain.attention is not None:
        words = len(prompt_tokens(entry.tokenizer, spec.params.prompt))
        maps += words
        parts.append(f"{words} attention maps (one per prompt word)")
    size = maps * h * w * item
    what = f"{' + '.join(parts) or 'no maps'} of {h} x {w} {spec.output.map_dtype}"
    if spec.output.include_x0_previews:
        size += 3 * height * width * item
        what += f", an x0 preview of 3 x {height} x {width}"
    return size, what


def validate(spec: JobSpec, catalog: ModelCatalog, limits: Limits, max_message_bytes: int | None = None) -> JobSpec:
    """Check `spec` and return it with the model name resolved ('' -> the default). Raises InvalidArgument.
    `max_message_bytes`: the front's gRPC message limit, which one explained step's event must fit in."""
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
        f = entry.vae_scale_factor
        rise.check_latent((int(resolved.height or 0) // f, int(resolved.width or 0) // f))  # grid cells, Sobol dims
    if spec.explain.cam is not None:
        check_layers(spec.explain.cam.layers, entry, limits)
    if max_message_bytes is not None and explained and spec.explain.methods:
        size, what = step_event_bytes(spec, int(resolved.width or 0), int(resolved.height or 0), entry)
        room = max_message_bytes - EVENT_OVERHEAD_BYTES
        if size > room:
            raise InvalidArgument("explain", f"one explained step's event would be {size / 2**20:.1f} MiB ({what}); "
                                             f"allowed at most {room / 2**20:.1f} MiB, the message limit less "
                                             "framing (map_dtype float16, fewer CAM layers, a shorter prompt, no "
                                             "x0 previews or a smaller image)")
    return dataclasses.replace(spec, model=entry.name)
