"""The HTTP edge's parts in-process: the header limits of the HTTP server (a real uvicorn on a
free port, in a thread of this process), safe log records, settings errors without secrets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

import pydantic
import pytest
import uvicorn

from harness.servers import free_port
from models.schema import EXAMPLE_CUSTOMER, Customer
from serving import logs
from serving.edge.protocol import BoundedHttpToolsProtocol
from serving.settings import Settings, SettingsError, redact_url

# ----------------------------------------------------------------------------- header limits

LIMIT = 4096
TIMEOUT_S = 0.6
KEEP_ALIVE_S = 5


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/sleep":  # an answer that takes longer than the header timeout
        await asyncio.sleep(TIMEOUT_S * 2)
    body = f"{scope['path']} {size}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class Limited(BoundedHttpToolsProtocol):
    max_header_bytes = LIMIT
    header_timeout_s = TIMEOUT_S


@pytest.fixture(scope="module")
def port():
    """uvicorn serving a tiny app with the bounded protocol, as the worker runs it."""
    config = uvicorn.Config(
        _app, host="127.0.0.1", port=free_port(), http=Limited, timeout_keep_alive=KEEP_ALIVE_S, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield config.port
    server.should_exit = True
    thread.join(10)


def request(path: str = "/", *headers: bytes, body: bytes = b"") -> bytes:
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def read_answers(sock: socket.socket, count: int = 1, timeout: float = 5) -> list[bytes]:
    """`count` whole answers (content-length framed), or fewer if the server closes."""
    sock.settimeout(timeout)
    data, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            if len(rest) < length:
                break
            answers.append(head + b"\r\n\r\n" + rest[:length])
            data = rest[length:]
            if len(answers) == count:
                return answers
        try:
            block = sock.recv(65536)
        except ConnectionResetError:
            block = b""
        if not block:
            return answers
        data += block
    return answers


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (reading whatever it sent), or None."""
    start = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


@contextlib.contextmanager
def connect(port: int):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        yield sock


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("small", lambda: [request("/a")], [200]),
        ("headers-just-under-the-limit", lambda: [request("/a", b"x-pad: " + b"a" * (LIMIT - 100))], [200]),
        ("one-header-over-the-limit", lambda: [request("/a", b"x-pad: " + b"a" * LIMIT)], [431]),
        (
            "many-small-headers-over-the-limit",
            lambda: [request("/a", *[b"x-h%d: v" % i for i in range(LIMIT // 8)])],
            [431],
        ),
        ("a-long-url", lambda: [request("/" + "u" * LIMIT)], [431]),
        (
            "head-over-the-limit-in-small-pieces",
            lambda: [bytes([b]) for b in request("/a", b"x-pad: " + b"a" * LIMIT)],
            [431],
        ),
        ("body-far-bigger-than-the-limit", lambda: [request("/a", body=b"b" * (40 * LIMIT))], [200]),
        ("two-pipelined-requests", lambda: [request("/a") + request("/b")], [200, 200]),
        (
            "pipelined-after-a-body-bigger-than-the-limit",
            lambda: [request("/a", body=b"b" * (3 * LIMIT)) + request("/b", b"x-pad: " + b"a" * (LIMIT - 200))],
            [200, 200],
        ),
        (
            "second-request-over-the-limit",  # sent apart, but they may arrive in one read
            lambda: [request("/a"), request("/b", b"x-pad: " + b"a" * (2 * LIMIT))],
            [200, 431],
        ),
        (
            # a head that began in the same read as the end of the request before it is counted
            # from the next read: refused by 2x the limit at most, never below the limit
            "second-request-far-over-the-limit-in-the-same-read",
            lambda: [request("/a") + request("/b", b"x-pad: " + b"a" * (2 * LIMIT))],
            [200, 431],
        ),
        (
            "pipelined-head-across-the-first-slice",  # 1 KiB + a 3.9 KiB head: 4.9 KiB in one read
            lambda: [request("/a", body=b"b" * 900) + request("/b", b"x-pad: " + b"a" * (LIMIT - 200))],
            [200, 200],
        ),
    ],
)
def test_request_heads_are_bounded_in_size(port, name, make, expected):
    with connect(port) as sock:
        for piece in make():
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(piece)
        answers = read_answers(sock, len(expected))
    assert [status(a) for a in answers] == expected, answers
    if expected[-1] == 431:
        assert b"larger than 4096 bytes" in answers[-1] and b"connection: close" in answers[-1]


def test_a_huge_header_block_is_refused_without_being_read(port):
    """16 MiB of header: refused after the first read past the limit, the rest never parsed."""
    start = time.monotonic()
    sent = 0
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nx-big: ")
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(256):
                sock.sendall(b"a" * 65536)
                sent += 65536
        answers = read_answers(sock)
    assert status(answers[0]) == 431
    assert time.monotonic() - start < 2
    assert sent < 16 * 1024 * 1024, "the server kept reading"


def test_headers_that_do_not_end_in_time_close_the_connection(port):
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        start = time.monotonic()
        for _ in range(3):  # a byte now and then does not keep it open
            time.sleep(TIMEOUT_S / 4)
            sock.sendall(b"x")
        answers = read_answers(sock, timeout=5)
        elapsed = time.monotonic() - start
    assert [status(a) for a in answers] == [408]
    assert TIMEOUT_S * 0.8 < elapsed < TIMEOUT_S + 1


def test_a_connection_that_sends_nothing_is_closed_silently(port):
    with connect(port) as sock:
        closed = closed_within(sock, TIMEOUT_S + 2)
    assert closed is not None and TIMEOUT_S * 0.8 < closed < TIMEOUT_S + 1


def test_headers_slower_than_one_read_but_in_time_are_answered(port):
    with connect(port) as sock:
        for piece in (b"POST /slow HTTP/1.1\r\n", b"Host: t\r\n", b"content-length: 0\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(TIMEOUT_S / 6)
        assert [status(a) for a in read_answers(sock)] == [200]


def test_idle_keep_alive_is_not_a_slow_header(port):
    """Between requests the connection is uvicorn's keep-alive's to close; the next request's
    headers get their own time from their first byte."""
    with connect(port) as sock:
        sock.sendall(request("/first"))
        assert [status(a) for a in read_answers(sock)] == [200]
        time.sleep(TIMEOUT_S * 2)  # idle longer than the header timeout, shorter than keep-alive
        sock.sendall(request("/second"))
        assert [status(a) for a in read_answers(sock)] == [200]
        sock.sendall(b"GET /third HTTP/1.1\r\nHost: t\r\n")  # then a slow one
        start = time.monotonic()
        answers = read_answers(sock, timeout=5)
        assert [status(a) for a in answers] == [408]
        assert time.monotonic() - start < TIMEOUT_S + 1


def test_a_refusal_waits_for_the_answers_before_it(port):
    """A pipelined head that times out while the request before it is being answered: that
    answer first, then the 408 (answers stay in order)."""
    with connect(port) as sock:
        sock.sendall(request("/sleep") + b"GET /next HTTP/1.1\r\nHost: t\r\n")
        answers = read_answers(sock, 2, timeout=10)
    assert [status(a) for a in answers] == [200, 408]
    assert answers[0].endswith(b"/sleep 0")


def test_install_makes_it_uvicorns_auto_protocol():
    from uvicorn.config import HTTP_PROTOCOLS

    from serving.edge import protocol

    saved = dict(HTTP_PROTOCOLS)
    try:
        assert protocol.install(2048, 3.0)
        config = uvicorn.Config(_app)
        config.load()
        assert config.http_protocol_class is BoundedHttpToolsProtocol
        assert (BoundedHttpToolsProtocol.max_header_bytes, BoundedHttpToolsProtocol.header_timeout_s) == (2048, 3.0)
    finally:
        HTTP_PROTOCOLS.update(saved)
        protocol.install()


def test_the_issue_defaults():
    settings = Settings()
    assert (settings.max_header_bytes, settings.header_timeout_s) == (16 * 1024, 10.0)


# ----------------------------------------------------------------------------- safe log records

SECRET = "s3cret-Pa55"
CUSTOMER_MARK = "Atlantis-7f3a"


def _invalid() -> pydantic.ValidationError:
    bad = {**EXAMPLE_CUSTOMER, "Geography": CUSTOMER_MARK}
    del bad["Age"]
    try:
        Customer.model_validate(bad)
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("no validation error")


def _chained() -> BaseException:
    try:
        try:
            raise _invalid()
        except pydantic.ValidationError as exc:
            raise RuntimeError("scoring failed") from exc
    except RuntimeError as outer:
        return outer


def _formatted(record: logging.LogRecord) -> str:
    logs.SafeLogFilter().filter(record)
    return logging.Formatter("%(levelname)s %(message)s").format(record)


def _record(msg: str, args: tuple = (), exc: BaseException | None = None, level: int = logging.ERROR):
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("bentoml._internal.server.http_app", level, __file__, 1, msg, args, exc_info)


@pytest.fixture
def secret():
    logs.register_secret(SECRET)
    yield SECRET
    logs._secrets.discard(SECRET)


@pytest.mark.parametrize(
    ("name", "make", "says", "never"),
    [
        (
            "bentomls-validation-log",  # log_exception(request) on a 400
            lambda: _record("Exception on %s [%s]", ("/explain", "POST"), _invalid()),
            ["WARNING Exception on /explain [POST]: 2 validation errors", "Geography: literal_error", "Age: missing"],
            [CUSTOMER_MARK, "input_value", "Traceback", "101348.88"],
        ),
        (
            "validation-error-as-an-argument",
            lambda: _record("bad request: %s", (_invalid(),), level=logging.INFO),
            ["INFO bad request: 2 validation errors"],
            [CUSTOMER_MARK, "101348.88"],
        ),
        (
            "validation-error-chained",
            lambda: _record("failed", exc=_chained()),
            ["WARNING failed (caused by 2 validation errors", "RuntimeError: scoring failed", "Traceback"],
            [CUSTOMER_MARK, "101348.88"],
        ),
        (
            "forged-line",
            lambda: _record("path=%s", ("/x\r\n2026-12-03 [INFO] forged\u2028",), level=logging.WARNING),
            ["path=/x\\x0d\\x0a2026-12-03 [INFO] forged\\u2028"],
            ["\n", "\r", "\u2028"],
        ),
        ("plain", lambda: _record("hello %s", ("world",), level=logging.INFO), ["INFO hello world"], []),
    ],
)
def test_log_records_carry_no_values_and_stay_on_one_line(name, make, says, never):
    text = _formatted(make())
    for fragment in says:
        assert fragment in text, text
    for fragment in never:
        assert fragment not in text, text


def test_secrets_are_masked_in_messages_and_tracebacks(secret):
    try:
        raise ConnectionError(f"cannot reach redis://:{secret}@redis:6379/0")
    except ConnectionError as exc:
        record = _record("jobs store down: %s", (f"redis://:{secret}@redis",), exc)
    text = _formatted(record)
    assert secret not in text and "redis://:***@redis" in text and "ConnectionError" in text


def test_install_puts_the_filter_on_every_handler():
    handler = logging.StreamHandler()
    logger = logging.getLogger("bank_churn.test.install")
    logger.addHandler(handler)
    try:
        assert logs.install() >= 1
        assert logs._FILTER in handler.filters
        logs.install()
        assert handler.filters.count(logs._FILTER) == 1
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"BANKCHURN_REDIS_URL": f"redis//:{SECRET}@redis:6379/0"}, "BANKCHURN_REDIS_URL: String should match"),
        ({"BANKCHURN_REDIS_URL": f"http://:{SECRET}@redis"}, "value not shown"),
        ({"BANKCHURN_MAX_QUEUE": "lots"}, "BANKCHURN_MAX_QUEUE: Input should be a valid integer"),
        ({"BANKCHURN_HEADER_TIMEOUT_S": "0"}, "BANKCHURN_HEADER_TIMEOUT_S: Input should be greater than 0"),
        (  # a rule across settings: pydantic's input is every setting, the Redis URL included
            {"BANKCHURN_REDIS_URL": f"redis://:{SECRET}@redis:6379/0", "BANKCHURN_REDIS_CA_FILE": "/etc/hosts"},
            "BANKCHURN_REDIS_CA_FILE is set but BANKCHURN_REDIS_URL is not a rediss://",
        ),
        (
            {"BANKCHURN_PREDICTION_LOG_REDIS_URL": f"redis//:{SECRET}@redis"},
            "BANKCHURN_PREDICTION_LOG_REDIS_URL: String should match",
        ),
    ],
)
def test_a_bad_setting_is_named_and_a_secret_one_never_shown(monkeypatch, env, says):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=says) as info:
        Settings()
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_settings_repr_masks_the_redis_password(monkeypatch):
    monkeypatch.setenv("BANKCHURN_REDIS_URL", f"redis://default:{SECRET}@redis:6379/0")
    settings = Settings()
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert "redis://default:***@redis:6379/0" in repr(settings)
    assert SECRET in settings.secret_values()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://default:p%40w@h", "rediss://default:***@h"),
        ("redis://token@h", "redis://:***@h"),
        ("redis//:pw@h", "***@h"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_edge_answers_are_json_with_the_same_shape():
    """HttpError, send_json and send_error make the one error body every refusal uses."""
    from serving.edge import HttpError, send_error

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    asyncio.run(send_error(send, HttpError(401, "no key", headers={"WWW-Authenticate": "Bearer"}, hint="x")))
    assert sent[0]["status"] == 401 and (b"www-authenticate", b"Bearer") in sent[0]["headers"]
    assert sent[1]["body"] == b'{"error":"no key","hint":"x"}'
