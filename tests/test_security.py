"""The edge against hostile clients, on a real `bentoml serve` with API keys: every route without
a key, with an unknown key, with a key of the wrong scope (both header styles); BentoML's
Python client with a token; the keys file changed while serving; request headers too large or
too slow (3,000 slow connections while /predict answers); start-up with a bad keys file or a
bad Redis URL; and the server's log after all of it, read for customer values and keys."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.data import customers_csv
from harness.servers import ROOT, ServeProcess, metric, serving
from harness.slowloris import big_header, raise_open_files_limit, slow_headers
from models.schema import EXAMPLE_CUSTOMER
from serving.auth import RELOAD_CHECK_S
from serving.keys import key_line, new_key

pytestmark = pytest.mark.integration  # real `bentoml serve` processes

HEADER_TIMEOUT_S = 2.0
SLOW_CONNECTIONS = 3_000
# Customer values that no log line may carry: sent in good and bad requests to every route.
GEOGRAPHY_MARK = "Atlantis-q7Zr"
SALARY_MARK = 98765.4321
MARKED = {**EXAMPLE_CUSTOMER, "EstimatedSalary": SALARY_MARK}


class Keys:
    """One key per scope set, minted as `python -m serving.keys new` does."""

    def __init__(self, path: Path):
        self.path = path
        self.crm, self.etl, self.ops, self.both = new_key(), new_key(), new_key(), new_key()
        self.unknown = new_key()  # never in the file
        self.lines = [
            key_line("crm", ["predict"], self.crm),
            key_line("etl", ["jobs"], self.etl),
            key_line("ops", ["admin"], self.ops),
            key_line("both", ["predict", "jobs"], self.both),
        ]
        self.write(self.lines)

    def write(self, lines: list[str]) -> None:
        """Replace the file at once, as Kubernetes swaps a Secret volume's files."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("# test keys\n" + "\n".join(lines) + "\n")
        os.replace(tmp, self.path)

    def all(self) -> list[str]:
        return [self.crm, self.etl, self.ops, self.both, self.unknown]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys") / "api-keys")


@pytest.fixture(scope="module")
def guarded(trained, keys):
    """The service with API keys, every request logged, and a short header timeout."""
    assert raise_open_files_limit(SLOW_CONNECTIONS * 2 + 1_000) >= SLOW_CONNECTIONS + 500
    env = {
        "BANKCHURN_MODEL_TAG": str(trained.model.tag),
        "BANKCHURN_API_KEYS_FILE": str(keys.path),
        "BANKCHURN_ACCESS_LOG": "all",
        "BANKCHURN_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }
    with serving(env=env) as proc:
        yield proc


# ----------------------------------------------------------------------------- every route


def v2_body(customer: dict[str, Any]) -> dict[str, Any]:
    def tensor(name: str, value: Any) -> dict[str, Any]:
        datatype = "BYTES" if isinstance(value, str) else "FP64" if isinstance(value, float) else "INT64"
        return {"name": name, "shape": [1], "datatype": datatype, "data": [value]}

    return {"inputs": [tensor(name, value) for name, value in customer.items()]}


JOB = "A" * 22  # a well-formed job id nobody has
CSV = customers_csv(3)

# (id, method, path, request arguments, scope, status with a key of that scope)
ROUTES: list[tuple[str, str, str, Callable[[], dict[str, Any]], str, int]] = [
    ("predict", "POST", "/predict", lambda: {"json": {"customer": MARKED}}, "predict", 200),
    (
        "predict-multipart",  # BentoML's own route for the same API
        "POST",
        "/predict",
        lambda: {"files": {"customer": ("c.json", json.dumps(MARKED), "application/json")}},
        "predict",
        200,
    ),
    ("predict_batch", "POST", "/predict_batch", lambda: {"json": {"customers": [MARKED]}}, "predict", 200),
    ("explain", "POST", "/explain", lambda: {"json": {"customer": MARKED}}, "predict", 200),
    ("model_card", "POST", "/model_card", lambda: {"json": {}}, "predict", 200),
    ("v2-server", "GET", "/v2", dict, "predict", 200),
    ("v2-model", "GET", "/v2/models/bank_churn", dict, "predict", 200),
    ("v2-model-ready", "GET", "/v2/models/bank_churn/ready", dict, "predict", 200),
    ("v2-infer", "POST", "/v2/models/bank_churn/infer", lambda: {"json": v2_body(MARKED)}, "predict", 200),
    ("jobs-submit", "POST", "/jobs", lambda: {"files": {"file": ("c.csv", CSV, "text/csv")}}, "jobs", 202),
    ("jobs-status", "GET", f"/jobs/{JOB}", dict, "jobs", 404),
    ("jobs-result", "GET", f"/jobs/{JOB}/result", dict, "jobs", 404),
    ("jobs-cancel", "DELETE", f"/jobs/{JOB}", dict, "jobs", 404),
    ("openapi", "GET", "/docs.json", dict, "any", 200),
    ("schema", "GET", "/schema.json", dict, "any", 200),
    ("docs-page", "GET", "/", dict, "any", 200),
    ("unknown-path", "GET", "/no/such/path", dict, "any", 404),
    ("unknown-method", "PUT", "/predict", lambda: {"json": {}}, "predict", 405),
]
SCOPED = [r for r in ROUTES if r[4] != "any"]
OPEN = ["/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready"]
STYLES = {
    "bearer": lambda key: {"Authorization": f"Bearer {key}"},
    "x-api-key": lambda key: {"X-API-Key": key},
}


def holder(keys: Keys, scope: str) -> str:
    return {"predict": keys.crm, "jobs": keys.etl, "any": keys.etl}[scope]


def outsider(keys: Keys, scope: str) -> str:
    """A valid key without the scope."""
    return {"predict": keys.etl, "jobs": keys.crm}[scope]


def call(server, method: str, path: str, make: Callable[[], dict[str, Any]], headers: dict[str, str] | None = None):
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **make())


def route_ids(routes):
    return [r[0] for r in routes]


@pytest.mark.parametrize(("method", "path", "make", "scope", "ok"), [r[1:] for r in ROUTES], ids=route_ids(ROUTES))
def test_without_a_key_every_route_is_401(guarded, method, path, make, scope, ok):
    r = call(guarded, method, path, make)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer ")
    assert "Authorization: Bearer <key> or X-API-Key: <key>" in r.json()["error"]


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize(("method", "path", "make", "scope", "ok"), [r[1:] for r in ROUTES], ids=route_ids(ROUTES))
def test_an_unknown_key_is_401(guarded, keys, style, method, path, make, scope, ok):
    r = call(guarded, method, path, make, STYLES[style](keys.unknown))
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.json() == {"error": "unknown API key"}


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize(("method", "path", "make", "scope", "ok"), [r[1:] for r in SCOPED], ids=route_ids(SCOPED))
def test_a_key_without_the_routes_scope_is_403(guarded, keys, style, method, path, make, scope, ok):
    r = call(guarded, method, path, make, STYLES[style](outsider(keys, scope)))
    assert r.status_code == 403, r.text
    assert f"lacks the '{scope}' scope" in r.json()["error"]
    assert "www-authenticate" not in r.headers


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize(("method", "path", "make", "scope", "ok"), [r[1:] for r in ROUTES], ids=route_ids(ROUTES))
def test_a_key_with_the_scope_is_served(guarded, keys, style, method, path, make, scope, ok):
    r = call(guarded, method, path, make, STYLES[style](holder(keys, scope)))
    assert r.status_code == ok, r.text[:500]


@pytest.mark.parametrize(
    ("key", "path", "status"),
    [("ops", f"/jobs/{JOB}", 404), ("ops", "/predict", 403), ("both", f"/jobs/{JOB}", 404), ("both", "/predict", 200)],
)
def test_admin_includes_jobs_and_nothing_else(guarded, keys, key, path, status):
    method, make = ("GET", dict) if path.startswith("/jobs") else ("POST", lambda: {"json": {"customer": MARKED}})
    assert call(guarded, method, path, make, STYLES["bearer"](getattr(keys, key))).status_code == status


@pytest.mark.parametrize("path", OPEN)
def test_probes_and_metrics_need_no_key(guarded, path):
    assert httpx.get(guarded.url + path).status_code == 200


def test_refusals_are_counted_by_reason_and_named_in_the_access_log(guarded, keys):
    def failures(reason: str) -> float:
        return metric(httpx.get(f"{guarded.url}/metrics").text, "bank_churn_auth_failures_total", 0.0, reason=reason)

    before = {r: failures(r) for r in ("missing", "unknown", "scope")}
    call(guarded, "GET", "/v2", dict)
    call(guarded, "GET", "/v2", dict, STYLES["bearer"](keys.unknown))
    call(guarded, "GET", "/v2", dict, STYLES["x-api-key"](keys.etl))
    deadline = time.monotonic() + 5
    while any(failures(r) < before[r] + 1 for r in before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {r: failures(r) - before[r] for r in before} == {"missing": 1, "unknown": 1, "scope": 1}
    assert "path=/v2) (status=403," in guarded.log() and ",key=etl)" in guarded.log()


def test_bentomls_python_client_sends_its_token(guarded, keys):
    import bentoml

    with bentoml.SyncHTTPClient(guarded.url, token=keys.crm) as client:
        assert 0 <= client.predict(customer=EXAMPLE_CUSTOMER)["churn_probability"] <= 1
        assert len(client.predict_batch(customers=[EXAMPLE_CUSTOMER] * 2)["predictions"]) == 2
        assert client.model_card()["tag"]
    with pytest.raises(bentoml.exceptions.BentoMLException), bentoml.SyncHTTPClient(guarded.url, token=keys.etl) as c:
        c.predict(customer=EXAMPLE_CUSTOMER)  # a jobs key: the schema is readable, predict is not
    with pytest.raises(bentoml.exceptions.BentoMLException), bentoml.SyncHTTPClient(guarded.url) as c:
        c.predict(customer=EXAMPLE_CUSTOMER)


TRITON = """
import json, sys
import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, key, customer = json.loads(sys.stdin.read())
client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
inputs = []
for name, value in customer.items():
    array = np.array([value], dtype=np.object_ if isinstance(value, str) else None)
    datatype = "BYTES" if isinstance(value, str) else "FP64" if isinstance(value, float) else "INT64"
    tensor = httpclient.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(array, binary_data=False)
    inputs.append(tensor)
seen = {"ready": client.is_server_ready()}
result = client.infer("bank_churn", inputs, headers={"Authorization": f"Bearer {key}"})
seen["probability"] = float(result.as_numpy("churn_probability")[0])
try:
    client.infer("bank_churn", inputs)
except InferenceServerException as exc:
    seen["without_key"] = exc.status()
print(json.dumps(seen))
"""


def test_tritonclient_sends_the_key_in_its_headers(guarded, keys):
    plan = json.dumps([guarded.url, keys.crm, EXAMPLE_CUSTOMER])
    out = subprocess.run(
        [str(ROOT / ".venv-clients" / "bin" / "python"), "-c", TRITON], input=plan, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["ready"] is True and 0 <= seen["probability"] <= 1 and seen["without_key"] == "401"


def test_the_client_example_runs_with_a_token(guarded, keys):
    proc = subprocess.run(
        [sys.executable, "examples/client.py", "--url", guarded.url, "--token", keys.crm],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for api in ("predict:", "predict_batch:", "explain:", "model_card:", "async predict:"):
        assert api in proc.stdout


def test_the_readmes_curl_with_a_bearer_key(guarded, keys):
    """The README's command, with this server's URL and a key in $BANKCHURN_API_KEY."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(curl -s localhost:3000/predict -H \"Authorization: Bearer[^`]*?)\n```", readme)
    assert command, "the README's curl example with a key is gone"
    script = command.group(1).replace("localhost:3000", guarded.url)
    out = subprocess.run(
        ["bash", "-c", script], env={**os.environ, "BANKCHURN_API_KEY": keys.crm}, capture_output=True, text=True
    )
    assert out.returncode == 0 and 0 <= json.loads(out.stdout)["churn_probability"] <= 1, out.stdout + out.stderr


def test_the_openapi_document_says_how_to_send_a_key(guarded, keys):
    spec = httpx.get(f"{guarded.url}/docs.json", headers=STYLES["bearer"](keys.crm)).json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key: Authorization: Bearer <key>",
    }
    assert {"bearer": []} in spec["security"] and {"apiKey": []} in spec["security"]
    assert spec["paths"]["/readyz"]["get"]["security"] == []


def test_a_key_added_or_removed_takes_effect_without_a_restart(guarded, keys):
    late = new_key()
    headers = STYLES["bearer"](late)

    def seconds_until(status: int) -> float:
        start = time.monotonic()
        while time.monotonic() - start < 60:
            if call(guarded, "GET", "/v2", dict, headers).status_code == status:
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"still not {status} after 60 s")

    assert call(guarded, "GET", "/v2", dict, headers).status_code == 401
    keys.write([*keys.lines, key_line("late", ["predict"], late)])
    added = seconds_until(200)
    keys.write(keys.lines)
    removed = seconds_until(401)
    print(f"\nkey added: served after {added:.1f} s; removed: refused after {removed:.1f} s")
    assert added <= RELOAD_CHECK_S + 5 and removed <= RELOAD_CHECK_S + 5
    assert call(
        guarded, "POST", "/predict", lambda: {"json": {"customer": MARKED}}, STYLES["bearer"](keys.crm)
    ).is_success


# ----------------------------------------------------------------------------- request headers


def raw(server, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while block := sock.recv(65536):
                out += block
        return out


def test_a_16_mib_header_block_is_refused_at_once(guarded, keys):
    attack = big_header(guarded.port)
    print(
        f"\n16 MiB header: {attack.status_line!r} after {attack.seconds * 1000:.0f} ms, {attack.sent_bytes // 1024} KiB taken in"
    )
    # Refused (or the connection closed) long before 16 MiB were taken in.
    assert attack.status_line in (b"", b"HTTP/1.1 431 Request Header Fields Too Large")
    assert attack.sent_bytes < 16 * 1024 * 1024 and attack.seconds < 5
    ok = call(guarded, "POST", "/predict", lambda: {"json": {"customer": MARKED}}, STYLES["bearer"](keys.crm))
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("name", "headers", "status"),
    [
        ("many-headers", [b"X-H%d: %s" % (i, b"v" * 40) for i in range(400)], 431),
        ("one-long-header", [b"X-Long: " + b"v" * 17_000], 431),
        ("long-bearer", [b"Authorization: Bearer " + b"k" * 17_000], 431),
        ("just-under-16-kib", [b"X-Long: " + b"v" * 15_000], 401),  # read, then refused for want of a key
    ],
)
def test_headers_over_16_kib_get_431(guarded, name, headers, status):
    head = b"GET /v2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    answer = raw(guarded, head)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]


def test_headers_that_trickle_past_the_timeout_close_the_connection(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\n")
        start = time.monotonic()
        answer = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while time.monotonic() - start < HEADER_TIMEOUT_S + 10:
                sock.sendall(b"X")  # a byte every 0.2 s keeps nothing open
                sock.settimeout(0.2)
                try:
                    block = sock.recv(65536)
                except TimeoutError:
                    continue
                answer += block
                if not block:
                    break
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b"", answer[:200]
    assert HEADER_TIMEOUT_S * 0.8 <= elapsed <= HEADER_TIMEOUT_S + 3


def test_3000_slow_header_connections_are_closed_while_predict_answers(guarded, keys):
    """Slowloris: 3,000 connections that start a request and send a header byte every second.
    Each is closed by the server once its headers are HEADER_TIMEOUT_S late; /predict answers
    throughout."""
    with httpx.Client(base_url=guarded.url, headers=STYLES["bearer"](keys.crm), timeout=30) as client:
        attack = slow_headers(
            guarded.port,
            SLOW_CONNECTIONS,
            give_up_s=HEADER_TIMEOUT_S + 60,
            probe=lambda: client.post("/predict", json={"customer": MARKED}).status_code,
        )
    print(f"\nheader timeout {HEADER_TIMEOUT_S:g} s: {attack.summary()}")
    assert attack.closed == SLOW_CONNECTIONS, f"{SLOW_CONNECTIONS - attack.closed} connections still open"
    assert attack.lifetimes_s[0] >= HEADER_TIMEOUT_S * 0.8, "closed before their time"
    assert attack.lifetimes_s[-1] <= HEADER_TIMEOUT_S + 20
    assert {status for status, _ in attack.answers} == {200} and len(attack.answers) >= 5
    assert httpx.get(f"{guarded.url}/readyz").status_code == 200
    refused = metric(
        httpx.get(f"{guarded.url}/metrics").text, "bank_churn_http_header_refusals_total", reason="timeout"
    )
    assert refused >= SLOW_CONNECTIONS


# ----------------------------------------------------------------------------- logs

FORGED = "forged-line"


def hostile_traffic(server, keys: Keys) -> None:
    """Bad and good requests carrying the marks, to every kind of route, with keys in headers."""
    bad = {**MARKED, "Geography": GEOGRAPHY_MARK}
    missing = {k: v for k, v in MARKED.items() if k != "Age"}  # pydantic quotes the whole customer
    auth = STYLES["bearer"](keys.both)
    for path, body in [
        ("/predict", {"customer": bad}),
        ("/predict", {"customer": missing}),
        ("/predict_batch", {"customers": [bad, missing]}),
        ("/predict_batch", {"customers": GEOGRAPHY_MARK}),
        ("/explain", {"customer": bad}),
        ("/explain", {"customer": missing}),
        ("/model_card", {GEOGRAPHY_MARK: SALARY_MARK}),
        ("/v2/models/bank_churn/infer", v2_body(bad)),
    ]:
        for headers in (auth, STYLES["x-api-key"](keys.both), STYLES["x-api-key"](keys.unknown)):
            httpx.post(server.url + path, json=body, headers=headers, timeout=60)
    httpx.post(f"{server.url}/explain", content=f'{{"customer": "{GEOGRAPHY_MARK}"', headers=auth)
    multipart = {"customer": ("c.json", json.dumps(bad), "application/json")}
    httpx.post(f"{server.url}/predict", files=multipart, headers=auth)
    bad_csv = CSV.decode().replace("France", GEOGRAPHY_MARK).encode()
    httpx.post(f"{server.url}/jobs", files={"file": ("c.csv", bad_csv, "text/csv")}, headers=auth)
    httpx.get(f"{server.url}/nothing%0d%0a{FORGED}%0a2026-01-01 [INFO] {FORGED}", headers=auth)
    httpx.get(f"{server.url}/v2%0d%0a{FORGED}", headers=STYLES["bearer"](keys.unknown))


def test_no_log_line_carries_a_customer_value_or_a_key(guarded, keys):
    hostile_traffic(guarded, keys)
    time.sleep(1)  # access-log lines are written just after the answers
    log = guarded.log()
    lines = log.splitlines()
    for mark in (GEOGRAPHY_MARK, str(SALARY_MARK), "input_value", *keys.all()):
        found = [line for line in lines if mark in line]
        assert not found, f"{mark!r} in the server log: {found[:3]}"
    assert not [line for line in lines if line.startswith(FORGED) or line.startswith("2026-01-01")]
    assert f"\\x0d\\x0a{FORGED}" in log  # the path was logged, escaped
    # BentoML did log its validation errors, without the values
    assert re.search(r"\[WARNING\].*Exception on /explain \[POST\]: \d+ validation errors? \(", log)
    assert "input values not logged" in log


# ----------------------------------------------------------------------------- start-up

REDIS_PASSWORD = "hunter2-redis-Pa55"
STARTS = {
    # (keys file content or None for a missing file, extra environment, what the last line says)
    "keys-file-missing": (None, {}, ["serving.auth.KeyFileError: BANKCHURN_API_KEYS_FILE=", "cannot read it"]),
    "keys-file-empty": ("# nobody yet\n", {}, ["KeyFileError:", "holds no key"]),
    "keys-file-with-a-raw-key": ("crm:predict:bck_not-a-digest\n", {}, ["KeyFileError:", "line 1 (crm)", "SHA-256"]),
    "redis-url-mistyped": (
        "",
        {"BANKCHURN_REDIS_URL": f"redis//:{REDIS_PASSWORD}@redis:6379/0"},
        ["serving.settings.SettingsError: invalid settings: BANKCHURN_REDIS_URL", "value not shown"],
    ),
}


@pytest.fixture(scope="module")
def failed_starts(trained, keys, tmp_path_factory) -> dict[str, tuple[int | None, float, str]]:
    """Each bad start-up at once; (exit code, seconds to exit, log)."""
    procs = {}
    for case, (content, env, _) in STARTS.items():
        path = tmp_path_factory.mktemp(case) / "api-keys"
        if content == "":
            path = keys.path
        elif content is not None:
            path.write_text(content)
        env = {"BANKCHURN_MODEL_TAG": str(trained.model.tag), "BANKCHURN_API_KEYS_FILE": str(path), **env}
        procs[case] = ServeProcess(env=env)
    start = time.monotonic()
    for proc in procs.values():
        proc.start()
    exits: dict[str, float] = {}
    try:
        while len(exits) < len(procs) and time.monotonic() - start < 60:
            for case, proc in procs.items():
                if case not in exits and proc.proc.poll() is not None:
                    exits[case] = time.monotonic() - start
            time.sleep(0.1)
        return {case: (proc.proc.poll(), exits.get(case, float("inf")), proc.log()) for case, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.mark.parametrize("case", list(STARTS))
def test_a_bad_keys_file_or_setting_stops_start_up_with_a_clear_message(failed_starts, case):
    returncode, seconds, log = failed_starts[case]
    assert returncode not in (None, 0), log[-3000:]
    assert seconds < 30
    last = log.strip().splitlines()[-1]
    for fragment in STARTS[case][2]:
        assert fragment in last, log[-3000:]
    assert REDIS_PASSWORD not in log and "bck_not-a-digest" not in log


def test_without_a_keys_file_auth_is_off_and_the_log_says_so(server):
    assert "authentication is OFF: BANKCHURN_API_KEYS_FILE is not set" in server.log()
    assert httpx.post(f"{server.url}/predict", json={"customer": EXAMPLE_CUSTOMER}).status_code == 200
