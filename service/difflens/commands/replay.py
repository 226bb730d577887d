"""`difflens replay AUDIT.json`: re-run a job from its audit record (difflens.replay) and compare every hash."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflens.commands.client_flags import add_client_flags, check_client_flags, client_options
from difflens.commands.common import check_out, check_positive, check_server, rpc_error_line, write_failed
from difflens.commands.explain_flags import add_explanation_flags, explanation_given, explanation_options
from difflens.config import ServiceSettings
from difflens.errors import InvalidArgument


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="re-run a job from its audit record and compare every hash",
                       description="Regenerate the image and maps of AUDIT.json in-process and compare their hashes "
                                   "with the record's. Explanation flags re-explain the same image: other methods, "
                                   "steps or options (the image is still checked; maps the record lacks are new). "
                                   "Exit 0 if all compared items match, 1 if not, 2 on bad input.")
    p.add_argument("audit", metavar="AUDIT.json", type=Path)
    p.add_argument("--model", action="append", metavar="NAME=DIR", help="where the record's model is (by name)")
    p.add_argument("--model-dir", metavar="DIR", help="the model folder (overrides the name lookup)")
    p.add_argument("--device", metavar="cpu|cuda|cuda:N", help="default: the record's device")
    p.add_argument("--server", metavar="HOST:PORT", help="run it as a new job on a difflens server instead of "
                                                          "in-process (the record's model by name; its weights are "
                                                          "checked against the record's)")
    add_client_flags(p)
    p.add_argument("--out", type=Path, help="also write the outputs (pictures, npz, report, replay.json) here; "
                                            "required when re-explaining")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: the record's; maps "
                                                            "depend on it)")
    add_explanation_flags(p, keep="the record")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from difflens.replay import ReplayFailed, replay

    models = dict(ServiceSettings.parse_models(args.model))
    check_out(args.out)
    check_positive("--threads", args.threads)
    if args.server is not None:
        for flag in ("model", "model_dir", "device", "threads"):
            if getattr(args, flag) is not None:
                raise InvalidArgument(f"--{flag.replace('_', '-')}",
                                      "not used with --server (the server's models and settings apply)")
        check_server(args.server)
    else:
        check_client_flags(args)
    overrides = (lambda base: explanation_options(args, base)) if explanation_given(args) else None
    try:
        return replay(args.audit, model_dir=args.model_dir, models=models, device=args.device, out=args.out,
                      explain=overrides, server=args.server, threads=args.threads, client=client_options(args))
    except ReplayFailed as e:
        print(f"difflens: error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        line, status = rpc_error_line(e)
        print(line, file=sys.stderr)
        return status
    except OSError as e:  # writing --out (as explain reports it)
        return write_failed(args.out, e)
