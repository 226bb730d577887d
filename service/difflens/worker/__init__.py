"""The worker: takes jobs from the queue, runs the engine on its loaded models, publishes each step as it happens.

`Worker` (worker.py) is the loop; `JobRun` (job.py) one job; batching.py the cross-job UNet batching. The
`difflens worker` command is commands/worker.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difflens.worker.worker import Worker

__all__ = ["Worker"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pay for torch (`difflens --help` stays quick).
    if name == "Worker":
        from difflens.worker.worker import Worker

        return Worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
