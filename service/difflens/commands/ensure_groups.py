"""`difflens ensure-groups --model NAME ...`: each model's work stream and consumer group in Redis, then exit."""

from __future__ import annotations

import argparse
import logging
import sys

from difflens.config import ServiceSettings
from difflens.errors import InvalidArgument


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensure-groups", help="make each model's work stream and consumer group in Redis, then exit",
                       description="Create, where missing, the consumer group that workers read each model's work "
                                   "stream with, and exit 0. An autoscaler that watches a model's queue (KEDA's "
                                   "redis-streams trigger) reads that group, and finds none while the model has "
                                   "never had a worker: the Helm chart runs this as a post-install and "
                                   "post-upgrade hook, so a model added to a release gets its group even before "
                                   "the fronts roll. `difflens serve` does the same for its models at start-up.")
    p.add_argument("--model", action="append", required=True, metavar="NAME[=DIR]",
                   help="a model name (repeatable); NAME=DIR as `serve` takes it is accepted, the folder unused")
    p.add_argument("--redis", metavar="URL", help="Redis URL (default: DIFFLENS_REDIS_URL)")
    p.add_argument("--queue", metavar="NAME", help="queue (stream key prefix; default: DIFFLENS_QUEUE or difflens)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = [m.partition("=")[0] for m in args.model]
    if not all(names):
        raise InvalidArgument("--model", f"got {args.model}; expected NAME or NAME=DIR")
    settings = ServiceSettings.from_env(redis_url=args.redis, queue_name=args.queue)
    if not settings.redis_url:
        raise InvalidArgument("--redis", "needs the Redis URL (--redis or DIFFLENS_REDIS_URL)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from difflens.queue.redis_streams import connect
    from difflens.queue.redis_work import GROUP, work_stream

    queue = connect(settings)
    try:
        queue.prepare(names)
    finally:
        queue.close()
    streams = ", ".join(work_stream(settings.queue_name, n) for n in dict.fromkeys(names))
    print(f"difflens: consumer group {GROUP!r} ready on {streams}", file=sys.stderr)
    return 0
