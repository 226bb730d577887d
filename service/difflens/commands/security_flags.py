"""`difflens serve`'s flags of who may call and how (docs/security.md): API keys, tenants' limits and metric labels,
TLS; and the rule that a server without keys must say so (--no-auth), unless it is an embedded one on loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from difflens.errors import InvalidArgument


def add_security_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("who may call (docs/security.md; default: DIFFLENS_* environment)")
    a.add_argument("--auth-keys", metavar="PATH", help="the API key file (`difflens keys create`); re-read when it "
                                                       "changes (DIFFLENS_AUTH_KEYS)")
    a.add_argument("--no-auth", action="store_true", help="serve without API keys: anyone who reaches the port may "
                                                          "submit, read and cancel every job (the default only for "
                                                          "--embedded on a loopback --host)")
    a.add_argument("--tenant-rate", type=float, metavar="PER_S", help="calls per second per tenant, unless the key "
                                                                      "file says (default 20; 0: no limit)")
    a.add_argument("--tenant-burst", type=int, metavar="N", help="calls a tenant may make at once above its rate "
                                                                 "(default 40)")
    a.add_argument("--tenant-max-in-flight", type=int, metavar="N", help="jobs queued or running per tenant, unless "
                                                                         "the key file says (default 100; 0: none)")
    a.add_argument("--tenant-labels", metavar="T1,T2,...", help="tenants with a metric label of their own; the "
                                                                "others count as 'other' (default: none)")
    a.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (with --tls-key); re-read "
                                                     "when it changes")
    a.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    a.add_argument("--tls-client-ca", metavar="PEM", help="mutual TLS: clients need a certificate of this CA")


# Settings fields -> the serve flags that set them (their errors name the flag the user typed)
SECURITY_FLAGS = {"keys_file": "--auth-keys", "rate_per_s": "--tenant-rate", "burst": "--tenant-burst",
                  "max_in_flight": "--tenant-max-in-flight", "tenant_labels": "--tenant-labels",
                  "cert": "--tls-cert", "key": "--tls-key", "client_ca": "--tls-client-ca"}


def security_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """(AuthSettings, TlsSettings) of `serve`: the environment, then the flags."""
    from difflens.auth.settings import AuthSettings, TlsSettings, split_list

    try:
        auth = AuthSettings.from_env(os.environ, keys_file=args.auth_keys, rate_per_s=args.tenant_rate,
                                     burst=args.tenant_burst, max_in_flight=args.tenant_max_in_flight,
                                     tenant_labels=None if args.tenant_labels is None else split_list(
                                         args.tenant_labels))
        tls = TlsSettings.from_env(os.environ, cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    except InvalidArgument as e:
        raise InvalidArgument(SECURITY_FLAGS.get(e.field, e.field), e.message) from None
    if args.no_auth:
        if args.auth_keys is not None:
            raise InvalidArgument("--no-auth", "not with --auth-keys")
        auth = dataclasses.replace(auth, keys_file=None)  # over DIFFLENS_AUTH_KEYS too: the flag is explicit
    elif auth.keys_file is None and not (args.embedded and is_loopback(args.host)):
        raise InvalidArgument("--auth-keys", f"serving on {args.host} needs API keys: --auth-keys PATH (or "
                                             "DIFFLENS_AUTH_KEYS; `difflens keys create` makes the file), or "
                                             "--no-auth to let anyone who reaches the port use every job")
    return auth, tls


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
