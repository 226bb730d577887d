"""`difflens keys create|revoke|list`: the API key file of `difflens serve --auth-keys` (keys.py)."""

from __future__ import annotations

import argparse
import os
import sys

from difflens.errors import InvalidArgument

FILE_HELP = "the key file (default: DIFFLENS_AUTH_KEYS)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="make, revoke and list the API keys of the key file",
                       description="The key file `difflens serve --auth-keys` reads (re-read within seconds of a "
                                   "change, no restart). It stores only each key's SHA-256: a new key is printed "
                                   "once, on stdout, and cannot be shown again.")
    keys = p.add_subparsers(dest="keys_command", metavar="create|revoke|list", required=True)
    c = keys.add_parser("create", help="make a key for a tenant and print it once")
    c.add_argument("--tenant", required=True, help="the tenant the key acts for (its jobs, limits)")
    c.add_argument("--file", metavar="PATH", help=FILE_HELP + "; made if missing")
    c.add_argument("--id", metavar="ID", help="the key's id (default: a random one); logs name keys by id")
    c.set_defaults(run=run_create)
    r = keys.add_parser("revoke", help="take a key out of the file")
    r.add_argument("key_id", metavar="ID")
    r.add_argument("--file", metavar="PATH", help=FILE_HELP)
    r.set_defaults(run=run_revoke)
    ls = keys.add_parser("list", help="the file's keys: id, tenant, when made (no hashes)")
    ls.add_argument("--file", metavar="PATH", help=FILE_HELP)
    ls.set_defaults(run=run_list)


def key_file(args: argparse.Namespace) -> str:
    from difflens.auth.settings import AuthSettings

    path = args.file or AuthSettings.from_env(os.environ).keys_file
    if not path:
        raise InvalidArgument("--file", "the key file's path (--file or DIFFLENS_AUTH_KEYS)")
    return str(path)


def run_create(args: argparse.Namespace) -> int:
    from difflens.auth.keys import add_key

    path = key_file(args)
    key_id, key = add_key(path, args.tenant, args.id)
    print(key)
    print(f"difflens: key {key_id} of tenant {args.tenant!r} stored (as its SHA-256) in {path}; the key above is "
          "shown only this once", file=sys.stderr)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from difflens.auth.keys import revoke_key

    path = key_file(args)
    tenant = revoke_key(path, args.key_id)
    print(f"difflens: key {args.key_id} of tenant {tenant!r} revoked in {path}; fronts reading this file refuse it "
          "once they see the change", file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from difflens.auth.keys import list_keys

    for entry in list_keys(key_file(args)):
        print(f"{entry.get('id')}\t{entry.get('tenant')}\t{entry.get('created_at', '')}")
    return 0
