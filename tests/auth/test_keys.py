"""The API key file: `difflens keys` writes hashes only, atomically; the front's KeyStore authenticates against it
and takes a changed file (a Kubernetes Secret swapped through symlinks) without a restart, keeping its keys when
the new file does not parse."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from difflens.auth.keys import KeyFileError, KeyStore, add_key, key_hash, parse, revoke_key
from difflens.auth.settings import AuthSettings, TenantLimits
from difflens.cli import main
from difflens.errors import InvalidArgument

DEFAULTS = TenantLimits(rate_per_s=20, burst=40, max_in_flight=100)


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "create", "--tenant", "acme", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("dlk_") and len(key) > 40 and key not in err
    text = path.read_text()
    assert key not in text and key_hash(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and os.listdir(tmp_path) == ["keys.json"]  # no temporaries
    (entry,) = json.loads(text)["keys"]
    assert entry["tenant"] == "acme" and entry["id"] in err
    assert KeyStore(path, DEFAULTS).authenticate(key).tenant == "acme"


def test_revoke_takes_the_key_out_and_the_store_sees_it(tmp_path, capsys):
    path = tmp_path / "keys.json"
    kept_id, kept = add_key(path, "acme")
    gone_id, gone = add_key(path, "acme", "old-laptop")
    store = KeyStore(path, DEFAULTS)
    assert store.authenticate(gone).key_id == "old-laptop"
    assert main(["keys", "revoke", gone_id, "--file", str(path)]) == 0
    assert store.refresh() == "reloaded"
    assert store.authenticate(gone) is None and store.authenticate(kept).key_id == kept_id
    assert main(["keys", "revoke", gone_id, "--file", str(path)]) == 2
    assert "no key 'old-laptop'" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="already in"):
        add_key(path, "acme", kept_id)
    with pytest.raises(InvalidArgument, match="--tenant"):
        add_key(path, "not a tenant")


def test_no_key_a_wrong_key_and_a_near_miss_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    _, key = add_key(path, "acme")
    store = KeyStore(path, DEFAULTS)
    for wrong in (None, "", key[:-1], key + "x", key.upper(), key_hash(key)):
        assert store.authenticate(wrong) is None, wrong


def test_tenant_limits_come_from_the_file_over_the_defaults(tmp_path):
    path = tmp_path / "keys.json"
    _, small = add_key(path, "small")
    _, big = add_key(path, "big")
    doc = json.loads(path.read_text())
    doc["tenants"] = {"small": {"rate_per_s": 2, "max_in_flight": 3}}
    path.write_text(json.dumps(doc))
    store = KeyStore(path, DEFAULTS)
    assert store.authenticate(small).limits == TenantLimits(rate_per_s=2, burst=40, max_in_flight=3)
    assert store.authenticate(big).limits == DEFAULTS


@pytest.mark.parametrize(("doc", "says"), [
    ({"keys": []}, "\"version\": 1"),
    ({"version": 1, "keys": [{"id": "a", "tenant": "t", "sha256": "abc"}]}, "keys[0].sha256: expected 64"),
    ({"version": 1, "keys": [{"id": "a", "tenant": "no spaces", "sha256": "0" * 64}]}, "keys[0].tenant"),
    ({"version": 1, "keys": [{"id": "a", "tenant": "t", "sha256": "0" * 64},
                             {"id": "a", "tenant": "t", "sha256": "1" * 64}]}, "keys[1]: its id is in the file twice"),
    ({"version": 1, "keys": [], "tenants": {"t": {"rate_per_s": -1}}}, "tenants.t.rate_per_s"),
    ({"version": 1, "keys": [], "tenants": {"t": {"rate": 1}}}, "tenants.t: an object with any of"),
])
def test_a_bad_file_is_refused_naming_the_place_never_a_hash(doc, says):
    with pytest.raises(KeyFileError) as refused:
        parse(json.dumps(doc), DEFAULTS)
    assert says in str(refused.value) and "0" * 64 not in str(refused.value)


def _secret_mount(root, content: str, generation: int):
    """Write `content` as a kubelet does a Secret's file: a new timestamped folder, then ..data swapped to it."""
    folder = root / f"..2026_12_06_{generation}"
    folder.mkdir()
    (folder / "keys.json").write_text(content)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(folder.name)
    os.replace(tmp_link, root / "..data")
    if not (root / "keys.json").is_symlink():
        (root / "keys.json").symlink_to("..data/keys.json")


def test_a_secret_mount_swapped_through_symlinks_is_taken_and_a_broken_one_is_not(tmp_path, caplog):
    first = tmp_path / "first.json"
    _, old_key = add_key(first, "acme")
    mount = tmp_path / "secret"
    mount.mkdir()
    _secret_mount(mount, first.read_text(), 1)
    store = KeyStore(mount / "keys.json", DEFAULTS)
    assert store.refresh() == "unchanged"
    _, new_key = add_key(first, "globex")
    revoke_key(first, json.loads(first.read_text())["keys"][0]["id"])
    _secret_mount(mount, first.read_text(), 2)
    assert store.refresh() == "reloaded"
    assert store.authenticate(old_key) is None and store.authenticate(new_key).tenant == "globex"
    caplog.set_level(logging.DEBUG)
    _secret_mount(mount, '{"version": 1, "keys": [{"id": "x"', 3)  # a bad edit
    assert store.refresh() == "failed"
    assert store.authenticate(new_key).tenant == "globex"  # the keys read before stay
    assert "cannot be used" in caplog.text and new_key not in caplog.text and key_hash(new_key) not in caplog.text
    assert store.refresh() == "unchanged"  # told once, not at every poll


def test_auth_settings_from_the_environment_name_the_variable():
    s = AuthSettings.from_env({"DIFFLENS_AUTH_KEYS": "/k.json", "DIFFLENS_TENANT_RATE": "2.5",
                               "DIFFLENS_TENANT_LABELS": "acme, globex"}, burst=5)
    assert (s.keys_file, s.limits, s.tenant_labels) == ("/k.json", TenantLimits(2.5, 5, 100), ("acme", "globex"))
    with pytest.raises(InvalidArgument) as e:
        AuthSettings.from_env({"DIFFLENS_TENANT_MAX_IN_FLIGHT": "-1"})
    assert e.value.field == "DIFFLENS_TENANT_MAX_IN_FLIGHT"
    with pytest.raises(InvalidArgument, match="label of the tenants not listed"):
        AuthSettings(tenant_labels=("other",))
