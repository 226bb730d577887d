"""How the `difflens` commands that call a server connect to it (explain --server, models, replay --server,
delete): an API key and TLS files, the same flags on each.

The key comes from --api-key or, better (a command line is visible to every user of the machine), DIFFLENS_API_KEY.
grpc is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from difflens.errors import InvalidArgument

API_KEY_ENV = "DIFFLENS_API_KEY"
CLIENT_FLAGS = ("api_key", "tls_ca", "tls_cert", "tls_key")


def add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connecting to the server (with --server)")
    g.add_argument("--api-key", metavar="KEY", help=f"the API key the server requires (default: {API_KEY_ENV}, "
                                                    "which other users of this machine cannot see in its process "
                                                    "list)")
    g.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    g.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA (the server's certificate's)")
    g.add_argument("--tls-cert", metavar="PEM", help="mutual TLS: this client certificate (with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="mutual TLS: the client certificate's private key")


def check_client_flags(args: argparse.Namespace) -> None:
    """Connection flags given without --server would silently do nothing: refused, naming the first."""
    for flag in (*CLIENT_FLAGS, "tls"):
        if getattr(args, flag, None):
            raise InvalidArgument(f"--{flag.replace('_', '-')}", "only with --server (how to reach the server)")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """DifflensClient's keyword arguments from the flags (and DIFFLENS_API_KEY); InvalidArgument naming the flag of
    a TLS file that cannot be read, or of a client certificate without its key."""
    options: dict[str, Any] = {flag: getattr(args, flag, None) for flag in CLIENT_FLAGS}
    options["api_key"] = options["api_key"] or os.environ.get(API_KEY_ENV) or None
    options["tls"] = bool(getattr(args, "tls", False)) or None  # None: TLS where a TLS file is given
    if (options["tls_cert"] is None) != (options["tls_key"] is None):
        raise InvalidArgument("--tls-key" if options["tls_key"] is None else "--tls-cert",
                              "mutual TLS needs the client certificate and its key (both)")
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = options[flag]
        if path is not None and not os.access(path, os.R_OK):
            raise InvalidArgument(f"--{flag.replace('_', '-')}", f"{path}: no file this user can read")
    return options


def connect(args: argparse.Namespace, **kwargs: Any) -> Any:
    """A DifflensClient on args.server as the flags say."""
    from difflens.client import DifflensClient

    return DifflensClient(args.server, **client_options(args), **kwargs)
