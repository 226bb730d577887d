"""`difflens explain --server HOST:PORT MODEL PROMPT --out DIR ...`: the local command's options and outputs, run as
a job on a difflens server. grpc is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from difflens.commands.client_flags import connect
from difflens.commands.common import ProgressBar, build_request, check_server, rpc_error_line, write_failed
from difflens.commands.explain_flags import rise_summary
from difflens.errors import InvalidArgument

AUDIT_FILE = "audit.json"
COUNT_FIELDS = ("steps", "rise.num_masks", "rise.batch_size")


def remote_spec(args: argparse.Namespace) -> Any:
    """The local CLI's options -> a JobSpec (the same checks as `difflens explain`, before anything is sent)."""
    from difflens.engine.options import GenerationParams
    from difflens.jobs import JobSpec, OutputOptions

    for flag in ("backend", "triton_url", "triton_model", "device", "dtype"):
        if getattr(args, flag, None) is not None:
            raise InvalidArgument(f"--{flag.replace('_', '-')}", "not used with --server (the server's settings "
                                                                 "apply)")
    check_server(args.server)
    if args.timeout is not None and not args.timeout > 0:
        raise InvalidArgument("--timeout", f"got {args.timeout:g}; must be > 0 (seconds)")
    try:
        r = build_request(args)
    except InvalidArgument as e:  # a count under 1: tell the range this deployment allows, as the server would
        if e.field in COUNT_FIELDS:
            check_server_limits(args)
        raise
    model = "" if args.model_dir in ("-", "") else str(args.model_dir)
    # Progress events: the bar moves on every denoising step, not only on the explained ones.
    return JobSpec(model=model, params=GenerationParams(args.prompt, **r["generation"]), explain=r["explain"],
                   output=OutputOptions(map_dtype=args.map_dtype or "float32", progress_events=True))


def check_server_limits(args: argparse.Namespace) -> None:
    """The counts given (--steps, --masks, --batch) against the server's limits (ListModels): for a count the
    local checks refused, whose engine-wide range ([1, 1000000] masks) is not what this deployment allows (the
    server tells [1, 8192] for too many). Best effort: a server that cannot say (down, older) leaves the local
    error standing. Only on that error path: a normal call makes no extra round trip."""
    given = {"steps": args.steps, "rise.num_masks": getattr(args, "masks", None),
             "rise.batch_size": getattr(args, "batch", None)}
    if all(v is None for v in given.values()):
        return
    import grpc

    from difflens.config import Limits
    from difflens.validation import check_given_limits

    try:
        with connect(args, retries=0) as client:
            pb_limits = client.list_models(timeout=5).limits
    except grpc.RpcError:
        return
    if pb_limits.max_steps and pb_limits.max_masks and pb_limits.max_rise_batch:
        check_given_limits(given, Limits(max_steps=pb_limits.max_steps, max_masks=pb_limits.max_masks,
                                         max_rise_batch=pb_limits.max_rise_batch))


def warn_if_unserved(client: Any, model: str) -> None:
    """Say so when no worker serves the job's model (as the front last sampled it): the job then waits until one
    starts, and the bar would just not appear. Best effort: a front that cannot tell says nothing."""
    import grpc

    try:
        models = client.list_models(timeout=5).models
    except grpc.RpcError:
        return
    info = next((m for m in models if m.name == model or (not model and m.is_default)), None)
    if info is not None and info.live_workers == 0:
        print(f"difflens: no worker serves model {info.name!r} right now; the job waits until one starts",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """MODEL is a served model's name ('-' = the server's default). Writes what the local command writes,
    audit.json being the job's record."""
    spec = remote_spec(args)
    import grpc

    from difflens.client import explanation_from_events
    from difflens.jobs import Completed, Failed, Queued, Started
    from difflens.render import write_outputs

    progress = ProgressBar()
    with connect(args) as client:
        request = client.request(spec)  # with its idempotency key, which finds the job if interrupted early
        req_key = request.idempotency_key
        stream = client.explain(request, timeout=args.timeout)
        stream.on_break = lambda err: progress.on_break(stream.job_id, err)
        try:
            for event in stream:
                progress.on_event(event)
                if isinstance(event, Queued):
                    warn_if_unserved(client, spec.model)
        except grpc.RpcError as e:
            progress.close(completed=False)
            line, status = rpc_error_line(e)
            if stream.job_id and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                started = any(isinstance(ev, Started) for ev in stream.events)
                line += (f" (job {stream.job_id} has the same deadline and stops at its next step)" if started else
                         f" (job {stream.job_id} has the same deadline: it never started, and the queue fails it)")
            elif stream.job_id and e.code() == grpc.StatusCode.NOT_FOUND:
                line += (f" (job {stream.job_id}: the queue no longer has it - its records expired, or were lost "
                         "with the queue's data)")
            elif stream.job_id:  # the stream broke, not necessarily the job
                line += f" (job {stream.job_id} was running and may still be: WatchJob or GetJob it later)"
            print(line, file=sys.stderr)
            return status
        except KeyboardInterrupt:
            progress.close(completed=False)
            try:
                stream.cancel()
            except grpc.RpcError as e:  # e.g. interrupted while the stream was resuming from a front that died
                which = (f"job {stream.job_id}" if stream.job_id else
                         "the job (the server had not named it yet; if it was queued, its idempotency key "
                         f"{req_key} finds it: Submit the same request again)")
                print(f"difflens: interrupted; could not cancel {which} ({e.code().name}): it may still be "
                      f"running - CancelJob it later; nothing written", file=sys.stderr)
                return 130
            print(f"difflens: interrupted; job {stream.job_id} cancelled, nothing written", file=sys.stderr)
            return 130
    result = stream.result
    progress.close(completed=isinstance(result, Completed))
    if not isinstance(result, Completed):
        why = f"{result.code}: {result.message}" if isinstance(result, Failed) else "the stream ended early"
        print(f"difflens: error: job {stream.job_id} failed: {why}", file=sys.stderr)
        return 1
    exp = explanation_from_events(stream.events)
    for line in rise_summary(exp.steps):
        print(line)
    try:
        written = write_outputs(exp, args.out, companions={AUDIT_FILE: result.audit_json.encode("utf-8")})
    except OSError as e:
        return write_failed(args.out, e)
    print(f"difflens: wrote {len(written)} files to {args.out} (job {stream.job_id})")
    print(f"difflens: report: {written['report.html']}")
    return 0
