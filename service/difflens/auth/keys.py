"""The API key file: which keys exist, the tenant each belongs to, and tenants' own limits. JSON:

    {"version": 1,
     "keys": [{"id": "k3f9a1c2e7b04", "tenant": "acme", "sha256": "<64 hex digits>",
               "created_at": "2026-12-06T21:00:00Z"}],
     "tenants": {"acme": {"rate_per_s": 5, "burst": 10, "max_in_flight": 20}}}

Only a key's SHA-256 is stored. A key is 32 random bytes (secrets.token_urlsafe: 256 bits), so nobody can find a
key from its hash, however fast the hash: slow password hashes (bcrypt, argon2) exist for guessable passwords and
would only add milliseconds to every call here. Looking a presented key up by its hash leaks nothing through timing
either: what a lookup's time could reveal is about hashes of the caller's own guesses, not about a stored key.

`KeyStore` serves the keys to the front and takes a changed file without a restart: `refresh()` (the server calls
it every few seconds) compares the resolved path's stat, then the content's hash, so a Kubernetes Secret mount,
whose files are swapped through symlinks (`..data`), is seen as soon as the kubelet swaps it. A file that no longer
parses leaves the keys as they were. `add_key` / `revoke_key` (`difflens keys`) rewrite a file atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflens.auth.settings import TenantLimits, check_tenant
from difflens.errors import InvalidArgument

log = logging.getLogger(__name__)

VERSION = 1
KEY_PREFIX = "dlk_"  # tells a difflens key apart in a secret scanner's findings; not a secret itself
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
LIMIT_FIELDS = ("rate_per_s", "burst", "max_in_flight")


class KeyFileError(ValueError):
    """The key file cannot be used: says where in it (never a key or a hash)."""


@dataclass(frozen=True)
class Identity:
    """Who a call is from: the key's id (fit for logs), its tenant and the tenant's limits."""

    key_id: str
    tenant: str
    limits: TenantLimits


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse(data: bytes | str, defaults: TenantLimits) -> dict[str, Identity]:
    """The key file's text -> {sha256 of a key: its Identity}. KeyFileError naming the part that is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:  # the message says where, and never quotes the text
        raise KeyFileError(f"not JSON ({e})") from None
    return identities(doc, defaults)


def identities(doc: Any, defaults: TenantLimits) -> dict[str, Identity]:
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise KeyFileError(f"expected an object with \"version\": {VERSION}, \"keys\": [...], \"tenants\": {{...}}")
    keys, tenants = doc.get("keys", []), doc.get("tenants", {})
    if not isinstance(keys, list) or not isinstance(tenants, dict):
        raise KeyFileError("\"keys\" must be a list and \"tenants\" an object")
    limits = {name: tenant_limits(name, own, defaults) for name, own in tenants.items()}
    out: dict[str, Identity] = {}
    ids: set[str] = set()
    for i, entry in enumerate(keys):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: expected an object with id, tenant and sha256")
        key_id, tenant, digest = entry.get("id"), entry.get("tenant"), entry.get("sha256")
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            raise KeyFileError(f"{where}.id: 1-63 letters, digits, '.', '_' or '-'")
        try:
            check_tenant(f"{where}.tenant", tenant)  # type: ignore[arg-type]
        except InvalidArgument as e:
            raise KeyFileError(str(e)) from None
        if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
            raise KeyFileError(f"{where}.sha256: expected 64 lowercase hex digits")
        if key_id in ids or digest in out:
            raise KeyFileError(f"{where}: its {'id' if key_id in ids else 'key'} is in the file twice")
        ids.add(key_id)
        out[digest] = Identity(key_id, tenant, limits.get(tenant, defaults))  # type: ignore[arg-type]
    return out


def tenant_limits(tenant: str, own: Any, defaults: TenantLimits) -> TenantLimits:
    """A tenant's limits: its own fields of the file over the defaults."""
    where = f"tenants.{tenant}"
    try:
        check_tenant("tenants", tenant)
    except InvalidArgument as e:
        raise KeyFileError(str(e)) from None
    if not isinstance(own, dict) or set(own) - set(LIMIT_FIELDS):
        raise KeyFileError(f"{where}: an object with any of {', '.join(LIMIT_FIELDS)}")
    try:
        return TenantLimits(**{**{f: getattr(defaults, f) for f in LIMIT_FIELDS}, **own})
    except InvalidArgument as e:
        raise KeyFileError(f"{where}.{e}") from None


class KeyStore:
    """The front's keys, from `path`, current within one refresh(). Raises KeyFileError (or OSError) when the file
    cannot be used at start-up; later failures keep the keys it has."""

    def __init__(self, path: str | os.PathLike[str], defaults: TenantLimits) -> None:
        self.path = Path(path)
        self.defaults = defaults
        self._signature: tuple[Any, ...] | None = None
        self._digest = ""
        self._problem = ""  # the last refresh's, once logged
        self._keys: dict[str, Identity] = {}
        self.refresh(initial=True)

    def authenticate(self, key: str | None) -> Identity | None:
        """The Identity of `key`, or None for no key or one the file does not hold."""
        if not key:
            return None
        return self._keys.get(key_hash(key))

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(i.tenant for i in self._keys.values())

    def refresh(self, initial: bool = False) -> str:
        """Take the file again if it changed -> "unchanged", "reloaded" or "failed" (the keys stay; logged once per
        problem). A file that does not parse is tried again when it next changes; one that cannot be read (gone
        mid-swap), at every call."""
        signature: tuple[Any, ...] | None = None
        try:
            real = os.path.realpath(self.path)
            st = os.stat(real)
            signature = (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return "unchanged"
            data = Path(real).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            changed = digest != self._digest
            if changed:
                keys = parse(data, self.defaults)
                if not keys:
                    log.warning("the key file %s holds no keys: every call is refused", self.path)
                self._keys, self._digest = keys, digest  # one assignment each: readers see old or new keys
            self._signature, self._problem = signature, ""
        except (OSError, KeyFileError) as e:
            if initial:
                raise
            if isinstance(e, KeyFileError):
                self._signature = signature
            if str(e) != self._problem:
                log.error("the key file %s cannot be used (%s); the keys read before stay in force", self.path, e)
                self._problem = str(e)
            return "failed"
        if changed:
            log.info("%s the key file %s: %d keys of %d tenants", "read" if initial else "reloaded", self.path,
                     len(self._keys), len(self.tenants))
        return "reloaded" if changed else "unchanged"


# ---------------------------------------------------------------- difflens keys: rewriting the file


def add_key(path: str | os.PathLike[str], tenant: str, key_id: str | None = None) -> tuple[str, str]:
    """Make a key for `tenant`, store its hash in the file (made if missing) -> (key id, the key). The key itself
    is returned once and stored nowhere."""
    check_tenant("--tenant", tenant)
    if key_id is not None and not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidArgument("--id", f"got {key_id!r}; 1-63 letters, digits, '.', '_' or '-'")
    with _editing(path) as doc:
        taken = {entry.get("id") for entry in doc["keys"]}
        if key_id in taken:
            raise InvalidArgument("--id", f"{key_id!r} is already in {path}")
        key_id = key_id or next(k for k in iter(lambda: f"k{secrets.token_hex(6)}", None) if k not in taken)
        key = new_key()
        doc["keys"].append({"id": key_id, "tenant": tenant, "sha256": key_hash(key),
                            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return key_id, key


def revoke_key(path: str | os.PathLike[str], key_id: str) -> str:
    """Take the key `key_id` out of the file -> its tenant."""
    if not Path(path).exists():
        raise InvalidArgument("--file", f"{path}: no such file")
    with _editing(path) as doc:
        found = [e for e in doc["keys"] if e.get("id") == key_id]
        if not found:
            raise InvalidArgument("ID", f"no key {key_id!r} in {path}")
        doc["keys"] = [e for e in doc["keys"] if e.get("id") != key_id]
    return str(found[0]["tenant"])


def list_keys(path: str | os.PathLike[str]) -> list[Mapping[str, Any]]:
    """The file's keys as stored (id, tenant, created_at; the hashes are left out)."""
    doc = _read(Path(path))
    return [{k: v for k, v in e.items() if k != "sha256"} for e in doc["keys"]]


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
        identities(doc, TenantLimits())
    except FileNotFoundError:
        raise InvalidArgument("--file", f"{path}: no such file") from None
    except (ValueError, KeyFileError) as e:
        raise InvalidArgument("--file", f"{path}: {e}") from None
    return doc  # type: ignore[no-any-return]


@contextlib.contextmanager
def _editing(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The file's document, to change in place; written back atomically (a temporary file, fsynced, renamed over
    it, keeping its mode; 0600 for a new file) when the block ends without an error. Two `difflens keys` at once
    take turns: each holds a lock on the file's folder (a lock file would be left beside the keys)."""
    target = Path(os.path.realpath(path))  # a symlinked file is rewritten where it is, the link kept
    if not target.parent.is_dir():
        raise InvalidArgument("--file", f"{path}: no such folder")
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        doc = _read(target) if target.exists() else {"version": VERSION, "keys": [], "tenants": {}}
        yield doc
        identities(doc, TenantLimits())  # what is written must load
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o600
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)  # the umask may have narrowed it
            os.replace(tmp, target)
            os.fsync(folder)  # the rename itself, on disk
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        os.close(folder)  # and its lock
