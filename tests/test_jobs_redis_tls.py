"""BANKCHURN_REDIS_URL over TLS: a real redis-server serving TLS only, with a certificate the
test makes (openssl) for 127.0.0.1; the service must verify it against
BANKCHURN_REDIS_CA_FILE and refuse a server it cannot verify."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from harness.data import customers_csv, submit_job
from harness.fleet import RedisServer, require, wait_for_job
from harness.servers import ServeProcess, free_port
from serving.jobs.redisconn import redis_client
from serving.jobs.store import RedisJobStore, StoreUnavailable, job_key, new_job_id
from serving.settings import Settings, SettingsError

pytestmark = pytest.mark.integration

PASSWORD = "tls-test-" + "p" * 24


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        [require("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def make_server_cert(directory: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by the CA."""
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl = require("openssl")
    subprocess.run(
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "2", "-extfile", str(ext), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = make_ca(directory, "test-ca")
    _, other_ca = make_ca(directory, "other-ca")
    server_key, server_cert = make_server_cert(directory, ca_key, ca_cert)
    return {"ca": ca_cert, "other_ca": other_ca, "key": server_key, "cert": server_cert}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory, pki):
    port = free_port()
    server = RedisServer(
        tmp_path_factory.mktemp("redis-tls"),
        port=port,
        password=PASSWORD,
        args=(
            "--tls-port", str(port),
            "--tls-cert-file", str(pki["cert"]),
            "--tls-key-file", str(pki["key"]),
            "--tls-ca-cert-file", str(pki["ca"]),
            "--tls-auth-clients", "no",
            "--bind", "127.0.0.1 127.0.0.2",  # 127.0.0.2: an address its certificate does not name
        ),
        url=f"rediss://:{PASSWORD}@127.0.0.1:{port}/0",
    ).start()  # fmt: skip
    yield server
    server.stop()


def roundtrip(url: str, ca: Path | None) -> float:
    """Seconds for a job-store read over `url`; raises StoreUnavailable."""

    async def scenario():
        store = RedisJobStore(redis_client(url, ca_file=ca), 120)
        started = time.monotonic()
        try:
            assert await store.get(job_key(new_job_id())) is None
            return time.monotonic() - started
        finally:
            await store.close()

    return asyncio.run(scenario())


def test_the_server_certificate_is_verified_against_the_ca_file(tls_redis, pki):
    assert roundtrip(tls_redis.url, pki["ca"]) < 3
    for ca in (None, pki["other_ca"]):  # the system's CAs, another CA: neither signed it
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="not trusted"):
            roundtrip(tls_redis.url, ca)
        assert time.monotonic() - started < 3
    # a plain-text client gets nothing from a TLS port
    with pytest.raises(StoreUnavailable):
        roundtrip(tls_redis.url.replace("rediss://", "redis://"), None)


def test_the_host_name_is_checked_too(tls_redis, pki):
    wrong_name = tls_redis.url.replace("127.0.0.1", "127.0.0.2")  # same server, a name not in its certificate
    with pytest.raises(StoreUnavailable, match="not trusted"):
        roundtrip(wrong_name, pki["ca"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"redis_url": "redis://127.0.0.1:6379/0", "redis_ca_file": "ca.pem"}, "not a rediss://"),
        ({"redis_url": "rediss://127.0.0.1:6379/0", "redis_ca_file": "/nonexistent/ca.pem"}, "no such file"),
    ],
)
def test_a_ca_file_that_cannot_be_used_stops_start_up(env, message):
    with pytest.raises(SettingsError, match=message):  # the reason, never the URL (it may hold a password)
        Settings(**env)


def test_the_service_runs_jobs_over_tls(trained, tls_redis, pki):
    env = {
        "BANKCHURN_MODEL_TAG": str(trained.model.tag),
        "BANKCHURN_REDIS_URL": tls_redis.url,
        "BANKCHURN_REDIS_CA_FILE": str(pki["ca"]),
        "BANKCHURN_JOB_WORKERS": "1",
    }
    proc = ServeProcess(env=env).start()
    try:
        proc.wait_ready(180)
        job_id = submit_job(proc.url, customers_csv(50)).json()["job_id"]
        assert wait_for_job(proc.url, job_id, timeout=120)["rows_done"] == 50
        assert PASSWORD not in proc.log()
    finally:
        proc.stop()
