"""`difflens models --server HOST:PORT`: ListModels on a running server, as a table or JSON."""

from __future__ import annotations

import argparse
import sys

from difflens.commands.client_flags import add_client_flags, connect
from difflens.commands.common import check_server, rpc_error_line


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list a server's models: live workers, jobs waiting, defaults",
                       description="ListModels on a running server, as a table: each model with its live workers "
                                   "(heard from within the visibility timeout) and the jobs waiting in its queue, as "
                                   "the front last sampled them, and its sampling defaults.")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the gRPC front")
    p.add_argument("--json", action="store_true", help="print the ListModels response as JSON instead")
    add_client_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_server(args.server)
    import grpc
    from google.protobuf.json_format import MessageToJson

    from difflens.api.convert import SCHEDULERS

    with connect(args) as client:
        try:
            response = client.list_models(timeout=10)
        except grpc.RpcError as e:
            line, status = rpc_error_line(e)
            print(line, file=sys.stderr)
            return status
    if args.json:
        print(MessageToJson(response, preserving_proto_field_name=True))
        return 0
    rows = [("model", "workers", "waiting", "steps", "guidance", "scheduler", "size")]
    for m in response.models:
        scheduler = SCHEDULERS.get(m.default_scheduler, "unset")
        rows.append((m.name + (" (default)" if m.is_default else ""), str(m.live_workers), str(m.queue_depth),
                     str(m.default_steps), f"{m.default_guidance_scale:g}", scheduler,
                     f"{m.default_width}x{m.default_height}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
