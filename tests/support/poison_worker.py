"""`difflens worker` that dies on one prompt, as a worker does on a poison job (a crashing kernel, the OOM killer):

    python -m tests.support.poison_worker PROMPT worker --redis URL ...

The process exits at once (os._exit, no clean-up, as a SIGKILL) before the first denoising step of any job whose
prompt is PROMPT, once its claim holds (the delivery is counted). Test-only: it patches the worker in this process,
so nothing of it is reachable through the API or the product's own command."""

from __future__ import annotations

import os
import sys
from typing import Any

EXIT_CODE = 70


def main(argv: list[str]) -> int:
    prompt, rest = argv[0], argv[1:]
    from difflens.cli import main as difflens
    from difflens.worker.job import JobRun

    check = JobRun._check

    def dying_check(self: Any, index: int) -> None:
        if self.claim.spec.params.prompt == prompt and self._owned():
            print(f"poison_worker: job {self.claim.job_id} is the poison one: exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)
        check(self, index)

    JobRun._check = dying_check  # type: ignore[method-assign]
    return difflens(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
