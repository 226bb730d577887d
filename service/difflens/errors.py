"""Domain exceptions. The gRPC edge maps each class to one status code; the CLI prints them plainly."""

from __future__ import annotations


class DifflensError(Exception):
    """Base class of every error difflens raises on purpose."""


class InvalidArgument(DifflensError):
    """A request field is out of range or malformed. Always names the field and what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def shown(value: str, most: int = 64) -> str:
    """`value` as an error message repeats it: quoted (repr: a newline or NUL shows escaped, never raw in a log
    line) and cut to `most` characters, so that what is allowed, which follows it, still fits the message's 1 KiB
    (api/interceptors.py cuts longer ones)."""
    if len(value) <= most:
        return repr(value)
    return f"{value[:most]!r}... ({len(value) - most} more characters)"


class ModelLoadError(DifflensError):
    """A model folder cannot be loaded. Names the path and what is wrong with it."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class Cancelled(DifflensError):
    """The caller cancelled the job; raised between denoising steps."""


class DeadlineExceeded(DifflensError):
    """The job's deadline passed; raised between denoising steps."""


class ResourceExhausted(DifflensError):
    """Overload (queue full, budget exceeded). `retry_after_s` hints when to try again."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class NotReady(DifflensError):
    """The service cannot take work yet (model loading, draining)."""


class HookError(DifflensError):
    """A capture hook was installed twice or could not be installed."""


class BackendUnavailable(DifflensError):
    """The UNet's backend (a Triton server) cannot be reached mid-job: the job fails UNAVAILABLE and may be
    submitted again; the worker goes on with its next job."""


class Unauthenticated(DifflensError):
    """No API key, or one the key file does not hold. Its message is fixed: it never repeats what was sent."""

    def __init__(self) -> None:
        super().__init__("missing or unknown API key: send call metadata 'authorization: Bearer <key>'")


class FailedPrecondition(DifflensError):
    """The request is valid but the job is not in a state that allows it (deleting a job that has not ended)."""
