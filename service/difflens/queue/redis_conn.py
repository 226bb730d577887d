"""Connecting the queue to its Redis: the URL with the password and ACL user from the environment, the TLS files of a
rediss:// URL, the oldest Redis the queue runs on, and `connect`, which waits for a Redis that is not up yet.
Everything here that prints a URL hides its password (`redacted`)."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from difflens.config import ServiceSettings
from difflens.errors import NotReady

if TYPE_CHECKING:
    from difflens.queue.redis_streams import RedisStreamsQueue

log = logging.getLogger(__name__)

# The oldest Redis the queue runs on: XAUTOCLAIM (reclaiming a dead worker's jobs) came in 6.2. An older server
# would fail the first reclaim with "unknown command", long after start-up; connect() refuses it at once instead.
MIN_REDIS_VERSION = (6, 2)


def version_tuple(text: object) -> tuple[int, ...]:
    """'7.0.15' -> (7, 0, 15); () when `text` does not start with a dotted number."""
    found = re.match(r"\d+(?:\.\d+)*", str(text))
    return tuple(int(p) for p in found.group().split(".")) if found else ()


def redacted(url: str) -> str:
    """`url` with its password, if any, replaced by ***: fit for a log line or an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def with_password(url: str, password: str | None, username: str | None = None) -> str:
    """`url` carrying `password` (DIFFLENS_REDIS_PASSWORD: one Kubernetes Secret key serves the pods and KEDA) and
    `username` (DIFFLENS_REDIS_USERNAME: an ACL user) where the URL has none of its own; the URL's own win."""
    parts = urlsplit(url)
    add_user, add_password = bool(username) and not parts.username, bool(password) and parts.password is None
    if not (add_user or add_password):
        return url
    if parts.scheme == "unix":  # redis-py takes a socket's credentials from the query
        extra = [f"{k}={quote(v or '', safe='')}" for k, v, add in (("username", username, add_user),
                                                                    ("password", password, add_password)) if add]
        return f"{url}{'&' if parts.query else '?'}{'&'.join(extra)}"
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_own, own = userinfo.partition(":")
    user = quote(username or "", safe="") if add_user else user
    secret = f":{quote(password or '', safe='')}" if add_password else (f":{own}" if has_own else "")
    return urlunsplit(parts._replace(netloc=f"{user}{secret}@{hostport}"))


def tls_options(settings: ServiceSettings, url: str) -> dict[str, str]:
    """redis-py's options for the TLS files of a rediss:// URL (DIFFLENS_REDIS_TLS_CA, _CERT, _KEY): the CA Redis'
    certificate must chain to (default: the system's), and a client certificate where Redis asks for one.
    NotReady naming the variable when they are given for a URL without TLS (they would silently do nothing)."""
    given = {"ssl_ca_certs": settings.redis_tls_ca, "ssl_certfile": settings.redis_tls_cert,
             "ssl_keyfile": settings.redis_tls_key}
    options = {k: v for k, v in given.items() if v}
    if options and urlsplit(url).scheme != "rediss":
        raise NotReady(f"DIFFLENS_REDIS_TLS_*: given for {redacted(url)}, which does not use TLS (rediss://...)")
    if bool(settings.redis_tls_cert) != bool(settings.redis_tls_key):
        raise NotReady("DIFFLENS_REDIS_TLS_CERT and DIFFLENS_REDIS_TLS_KEY: a client certificate needs its key")
    return options


def connect(settings: ServiceSettings) -> RedisStreamsQueue:
    """The queue on settings.redis_url as soon as Redis answers, waiting up to settings.redis_wait_s for it: a front
    or worker rolled out beside its Redis, or started while it restarts, waits instead of dying with a traceback
    into a restart loop. After that (or at once for refused credentials): NotReady naming --redis and the URL,
    its password hidden."""
    url = with_password(str(settings.redis_url), settings.redis_password, settings.redis_username)
    from difflens.queue.redis_streams import RedisStreamsQueue  # it imports this module

    tls_options(settings, url)  # refused before any waiting
    end = time.monotonic() + settings.redis_wait_s
    told = False
    while True:
        queue = RedisStreamsQueue(url, settings)  # connects on its first command
        try:
            queue.ping()
            version = queue.server_version()
            if version is not None and version < MIN_REDIS_VERSION:
                queue.close()
                need = ".".join(map(str, MIN_REDIS_VERSION))
                raise NotReady(f"--redis: {redacted(url)} is Redis {'.'.join(map(str, version))}; difflens needs "
                               f"Redis >= {need} (XAUTOCLAIM reclaims the jobs of dead workers)")
            return queue
        except redis.AuthenticationError as e:
            queue.close()
            raise NotReady(f"--redis: {redacted(url)} refused the credentials: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:  # BusyLoadingError (still loading) is one too
            queue.close()
            if time.monotonic() >= end:
                raise NotReady(f"--redis: cannot reach {redacted(url)} (waited {settings.redis_wait_s:g} s, "
                               f"DIFFLENS_REDIS_WAIT_S): {e}") from None
            if not told:
                log.warning("waiting up to %g s for Redis at %s: %s", settings.redis_wait_s, redacted(url), e)
                told = True
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
