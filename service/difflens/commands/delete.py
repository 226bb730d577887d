"""`difflens delete JOB_ID...`: DeleteJob on a running server."""

from __future__ import annotations

import argparse
import sys

from difflens.commands.client_flags import add_client_flags, connect
from difflens.commands.common import check_server, rpc_error_line


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("delete", help="delete jobs that ended, with their events and records, before they expire",
                       description="DeleteJob on a running server: each job's events (its maps) and record leave the "
                                   "queue now instead of when they expire. A queued or running job is refused "
                                   "(cancel it first). Audit records a worker wrote to its --audit-dir stay.")
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the gRPC front")
    add_client_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    check_server(args.server)
    status = 0
    with connect(args) as client:
        for job_id in args.job_ids:
            try:
                job = client.delete(job_id, timeout=30)
            except grpc.RpcError as e:
                line, code = rpc_error_line(e)
                print(f"{line} (job {job_id})", file=sys.stderr)
                status = max(status, code)
                continue
            print(f"difflens: deleted job {job.id} ({job.state})")
    return status
