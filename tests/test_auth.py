"""API keys (serving.auth, serving.keys): the keys file, credentials, reloading, the policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.auth import (
    ADMIN,
    AUTHENTICATED,
    JOBS,
    OPEN,
    PREDICT,
    AuthError,
    KeyFileError,
    KeyRing,
    Principal,
    credential,
    digest,
    load_keyring,
    parse_keys,
    required_scope,
)
from serving.keys import key_line, new_key

CRM, ETL, OPS = "bck_crm-key", "bck_etl-key", "bck_ops-key"
KEYS = f"""
# clients of the churn service
crm:predict,jobs:{digest(CRM)}
etl:jobs:{digest(ETL)}   # nightly uploads

ops:admin:{digest(OPS).upper()}
"""


@pytest.fixture
def ring(tmp_path) -> KeyRing:
    path = tmp_path / "keys"
    path.write_text(KEYS)
    return KeyRing(path, reload_check_s=0)


def test_a_keys_file_gives_each_key_its_name_and_scopes():
    keys = parse_keys(KEYS)
    assert keys == {
        digest(CRM): Principal("crm", frozenset({PREDICT, JOBS})),
        digest(ETL): Principal("etl", frozenset({JOBS})),
        digest(OPS): Principal("ops", frozenset({ADMIN})),
    }


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("crm:predict", "3 fields"),
        ("crm:predict:" + digest(CRM) + ":x", "3 fields"),
        ("c rm:predict:" + digest(CRM), "the name must be"),
        (":predict:" + digest(CRM), "the name must be"),
        ("crm:read:" + digest(CRM), "unknown or no scope"),
        ("crm::" + digest(CRM), "unknown or no scope"),
        ("crm:predict:" + CRM, "SHA-256 in hex"),
        ("crm:predict:" + digest(CRM)[:63], "SHA-256 in hex"),
        (f"crm:predict:{digest(CRM)}\ncrm:jobs:{digest(ETL)}", "used twice"),
        (f"crm:predict:{digest(CRM)}\netl:jobs:{digest(CRM)}", "listed twice"),
    ],
)
def test_a_bad_line_is_named_without_quoting_it(line, says):
    with pytest.raises(KeyFileError, match=says) as info:
        parse_keys(line, "keys")
    assert "line " in str(info.value)
    assert CRM not in str(info.value)  # a key pasted in by mistake never reaches the log


@pytest.mark.parametrize(
    ("authorization", "api_key", "expected"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer abc", None, "abc"),
        ("BEARER  abc ", None, "abc"),
        (None, "abc", "abc"),
        ("Bearer abc", "other", "abc"),
        ("Basic dXNlcjpwYXNz", None, None),
        ("Bearer ", None, None),
        (None, "  ", None),
        (None, None, None),
    ],
)
def test_the_key_comes_from_a_bearer_token_or_x_api_key(authorization, api_key, expected):
    assert credential(authorization, api_key) == expected


@pytest.mark.parametrize(
    ("key", "scope", "status", "reason"),
    [
        (None, PREDICT, 401, "missing"),
        ("bck_nobody", PREDICT, 401, "unknown"),
        (CRM[:-1], PREDICT, 401, "unknown"),
        (ETL, PREDICT, 403, "scope"),
        (CRM, ADMIN, 403, "scope"),
        (ETL, AUTHENTICATED, None, None),
        (CRM, PREDICT, None, None),
        (CRM, JOBS, None, None),
        (OPS, JOBS, None, None),  # admin includes jobs
        (OPS, PREDICT, 403, "scope"),  # and nothing else
    ],
)
def test_check_refuses_with_401_or_403(ring, key, scope, status, reason):
    if status is None:
        assert ring.check(key, scope).may(scope) or scope == AUTHENTICATED
        return
    with pytest.raises(AuthError) as info:
        ring.check(key, scope)
    assert (info.value.status, info.value.reason) == (status, reason)
    assert info.value.headers.get("WWW-Authenticate", "").startswith("Bearer") == (status == 401)
    if key:
        assert key not in info.value.message


def test_failed_checks_are_counted_by_reason(ring):
    from serving import telemetry

    def count(reason: str) -> float:
        return telemetry.AUTH_FAILURES.labels(reason)._value.get()

    before = {r: count(r) for r in ("missing", "unknown", "scope")}
    for key, scope in ((None, PREDICT), ("bck_x", PREDICT), ("bck_y", PREDICT), (ETL, PREDICT)):
        with pytest.raises(AuthError):
            ring.check(key, scope)
    assert {r: count(r) - before[r] for r in before} == {"missing": 1, "unknown": 2, "scope": 1}


def test_a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_keys(ring):
    path = ring.path
    new = new_key()
    path.write_text(KEYS + key_line("new", [PREDICT], new) + "\n")
    os.utime(path, ns=(1, 10**18))  # a new mtime even within the file system's resolution
    assert ring.check(new, PREDICT).name == "new"
    path.write_text(f"crm:predict:{digest(CRM)}\n")  # etl, ops and new removed
    os.utime(path, ns=(1, 2 * 10**18))
    with pytest.raises(AuthError):
        ring.check(new, PREDICT)
    assert ring.check(CRM, PREDICT).name == "crm"
    path.write_text("not a keys file\n")
    os.utime(path, ns=(1, 3 * 10**18))
    assert ring.check(CRM, PREDICT).name == "crm"  # still the last good keys


def test_a_secret_volume_update_is_seen(tmp_path):
    """Kubernetes updates a Secret volume by swapping the ..data symlink to a new directory."""
    first, second = tmp_path / "..2026_12_01", tmp_path / "..2026_12_02"
    first.mkdir()
    second.mkdir()
    (first / "keys").write_text(f"crm:predict:{digest(CRM)}\n")
    (second / "keys").write_text(f"etl:predict:{digest(ETL)}\n")
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "keys").symlink_to("..data/keys")
    ring = KeyRing(tmp_path / "keys", reload_check_s=0)
    assert ring.check(CRM, PREDICT).name == "crm"
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert ring.check(ETL, PREDICT).name == "etl"
    with pytest.raises(AuthError):
        ring.check(CRM, PREDICT)


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot read it"), ("# nobody\n", "holds no key"), ("crm:predict:x\n", "SHA-256")],
)
def test_a_set_but_unusable_keys_file_stops_start_up(tmp_path, content, says):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KeyFileError, match=says):
        load_keyring(path)


def test_no_keys_file_means_auth_off():
    assert load_keyring(None) is None
    assert load_keyring("") is None


@pytest.mark.parametrize(
    ("path", "needs"),
    [
        ("/livez", OPEN),
        ("/readyz", OPEN),
        ("/metrics", OPEN),
        ("/v2/health/live", OPEN),
        ("/v2/health/ready", OPEN),
        ("/predict", PREDICT),
        ("/predict_batch", PREDICT),
        ("/explain", PREDICT),
        ("/model_card", PREDICT),
        ("/v2", PREDICT),
        ("/v2/models/bank_churn", PREDICT),
        ("/v2/models/bank_churn/ready", PREDICT),
        ("/v2/models/bank_churn/infer", PREDICT),
        ("/jobs", JOBS),
        ("/jobs/abc/result", JOBS),
        ("/docs.json", AUTHENTICATED),
        ("/schema.json", AUTHENTICATED),
        ("/", AUTHENTICATED),
        ("/no/such/path", AUTHENTICATED),
        ("/livez/", AUTHENTICATED),
        ("/v2health/live", AUTHENTICATED),
        ("/jobsx", AUTHENTICATED),
    ],
)
def test_every_route_needs_a_key_but_the_probes_and_metrics(path, needs):
    assert required_scope(path) == needs


def test_minted_keys_are_long_random_and_their_line_parses():
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100 and all(k.startswith("bck_") and len(k) >= 40 for k in keys)
    key = keys.pop()
    assert parse_keys(key_line("crm", [PREDICT, JOBS], key)) == {
        digest(key): Principal("crm", frozenset({PREDICT, JOBS}))
    }


def test_the_command_prints_the_key_once_and_a_line_that_checks(tmp_path):
    run = [sys.executable, "-m", "serving.keys"]
    out = subprocess.run([*run, "new", "--name", "crm", "--scopes", "predict,jobs"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    key = out.stdout.split("secret): ", 1)[1].split()[0]
    line = out.stdout.split("BANKCHURN_API_KEYS_FILE: ", 1)[1].strip()
    assert out.stdout.count(key) == 1 and digest(key) in line
    (tmp_path / "keys").write_text(line + "\n")
    check = subprocess.run([*run, "check", str(tmp_path / "keys")], capture_output=True, text=True)
    assert check.returncode == 0 and "1 keys: crm" in check.stdout
    bad = subprocess.run([*run, "new", "--name", "crm", "--scopes", "read"], capture_output=True, text=True)
    assert bad.returncode == 2 and "scopes are" in bad.stderr
