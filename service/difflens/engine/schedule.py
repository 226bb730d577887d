"""Timestep lists: exponential early/late packing (METHOD.md, R3) and validation of explicit lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from difflens.errors import InvalidArgument


def exponential_timesteps(
    stage: Literal["early", "late"], num_steps: int, shift: float, num_train_timesteps: int = 1000
) -> list[int]:
    """Timesteps packed toward t = T ("early", semantic stage) or t = 0 ("late", detail stage).

    Computed exactly as the reference code does (float power, truncation by int()), so results match it to the
    integer. Larger `shift` (lambda) packs more mildly. Raises InvalidArgument when the result is not strictly
    decreasing (small lambda repeats timesteps), naming n and lambda.
    """
    if stage not in ("early", "late"):
        raise InvalidArgument("sampling.kind", f"got {stage!r}; allowed: early, late")
    if num_steps < 1:
        raise InvalidArgument("steps", f"got {num_steps}; must be >= 1")
    if shift < 0:
        raise InvalidArgument("sampling.shift", f"got {shift}; must be >= 0")
    T = num_train_timesteps
    a = T ** (1 / (num_steps + shift))
    if stage == "late":
        ts = sorted((int(a ** (k + 1 + shift)) for k in range(num_steps)), reverse=True)
        if ts[0] == T:
            ts[0] = T - 1
    else:
        ts = [T - 1] + [T - int(a ** (k + 1 + shift)) for k in range(num_steps - 1)]
    try:
        check_timesteps(ts, num_train_timesteps)
    except InvalidArgument as e:
        raise InvalidArgument(
            "sampling.shift",
            f"exponential {stage} schedule with n={num_steps}, lambda={shift} is not strictly decreasing "
            f"({e.message}); use a larger lambda or fewer steps",
        ) from None
    return ts


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> list[int]:
    """Validate an explicit list: integers in [0, T), strictly decreasing. Returns it as a list of int."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise InvalidArgument("sampling.timesteps", "must not be empty")
    out = [t for t in ts if not 0 <= t < num_train_timesteps]
    if out:
        raise InvalidArgument("sampling.timesteps", f"{out} out of range; allowed [0, {num_train_timesteps - 1}]")
    for i in range(1, len(ts)):
        if ts[i] >= ts[i - 1]:
            raise InvalidArgument(
                "sampling.timesteps",
                f"must be strictly decreasing; position {i} has {ts[i]} after {ts[i - 1]}",
            )
    return ts
