"""HTTPClassifier against a scripted transport: wire format, batching, retries, backoff, rate limit, errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from deepzero_apps.blackbox import BlackBoxClassifier, BlackBoxError
from deepzero_apps.blackbox import http_client as remote
from deepzero_apps.blackbox.http_client import HTTPClassifier, decode, display_url, encode
from deepzero_apps.cli import main

URL = "http://user:pw@example.test:8000/predict?key=SECRET"


class Script:
    """A server answering each request with the next status in `statuses` (200: logits of the batch)."""

    def __init__(self, *statuses: int, kind: str = "logits", headers: dict | None = None):
        self.statuses, self.kind, self.headers, self.sizes = list(statuses), kind, headers or {}, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        x = decode(request.content)
        assert x.dtype == np.float32 and request.headers["content-type"] == remote.NPY
        status = self.statuses.pop(0) if self.statuses else 200
        self.sizes.append((len(x), status))
        if status != 200:
            return httpx.Response(status, text=f"status {status}", headers=self.headers)
        out = x.reshape(len(x), -1)[:, :4] * 2
        return httpx.Response(200, content=encode(out), headers={remote.OUTPUT_HEADER: self.kind})


class Clock:
    """Fake time for the client's loop: its sleeps advance it and are recorded."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(remote, "_now", fake.monotonic)
    monkeypatch.setattr(remote, "_sleep", fake.sleep)
    return fake


@pytest.fixture
def clients():
    made = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def client(clients):
    def make(script, url=URL, **kwargs) -> HTTPClassifier:
        clients.append(HTTPClassifier(url, transport=httpx.MockTransport(script), **kwargs))
        return clients[-1]

    return make


def test_batches_are_split_and_answers_decoded_exactly(clock, client):
    script, x = Script(), torch.rand(7, 1, 2, 2)
    out = client(script, max_batch=3)(x)
    assert torch.equal(out, x.reshape(7, -1) * 2) and script.sizes == [(3, 200), (3, 200), (1, 200)]


def test_retries_with_exponential_backoff_count_apart_from_images(clock, client):
    script = Script(503, 429, 500)
    c = client(script, retries=3, backoff=0.5)
    c(torch.rand(5, 1, 2, 2))
    assert clock.sleeps == [0.5, 1.0, 2.0]
    assert (c.images, c.retries, c.retried_images) == (5, 3, 15)
    assert c.state_dict() == {"requests": 4, "retries": 3, "retried_images": 15}


def test_retry_after_is_honoured_when_longer(clock, client):
    c = client(Script(429, headers={"Retry-After": "7"}), retries=1, backoff=0.5)
    c(torch.rand(1, 1, 2, 2))
    assert clock.sleeps == [7.0]


def test_down_after_retries_is_one_line_naming_the_url_without_secrets(clock, client):
    c = client(Script(502, 502, 502), retries=2, backoff=0.0)
    with pytest.raises(BlackBoxError) as info:
        BlackBoxClassifier(c, name="classifier")(torch.rand(2, 1, 2, 2))
    message = str(info.value)
    assert message == ("black box at http://example.test:8000/predict failed after 3 attempts; "
                       "last error: HTTP 502: status 502")
    assert "SECRET" not in message and "pw" not in message


def test_connection_errors_are_retried_then_reported(clock, client):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    c = client(refuse, retries=1, backoff=0.1)
    with pytest.raises(BlackBoxError, match="after 2 attempts; last error: ConnectError: connection refused"):
        c(torch.rand(1, 1, 2, 2))
    assert c.retries == 1 and c.images == 0


def test_client_errors_fail_at_once(clock, client):
    script = Script(400)
    with pytest.raises(BlackBoxError, match="refused the request: HTTP 400: status 400"):
        client(script, retries=5)(torch.rand(1, 1, 2, 2))
    assert len(script.sizes) == 1


def test_output_kind_must_match_the_server(clock, client):
    with pytest.raises(BlackBoxError, match="returns probs, but classifier.output=logits"):
        client(Script(kind="probs"))(torch.rand(1, 1, 2, 2))


def test_rate_limit_spaces_requests(clock, client):
    c = client(Script(), max_batch=1, rate_limit=4.0)
    c(torch.rand(3, 1, 2, 2))
    assert clock.sleeps == [0.25, 0.25]


def test_display_url_drops_credentials_query_and_fragment():
    assert display_url("https://u:p@api.test:9/v1/predict?key=s#f") == "https://api.test:9/v1/predict"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch >= 1"):
        HTTPClassifier(URL, max_batch=0)


@pytest.mark.parametrize(
    ("override", "needle"),
    [("classifier=http classifier.url=http://127.0.0.1:9/p", "serve needs a local classifier"), (f"port=70000 classifier.path={__file__}", "port=70000")],
)
def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path, capsys, override, needle):
    assert main(["serve", f"hydra.run.dir={tmp_path}", *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(("header", "slept"), [("3600", 5.0), ("inf", 0.5), ("nan", 0.5), ("-3", 0.5),
                                               ("Wed, 21 Oct 2099 07:28:00 GMT", 5.0), ("soon", 0.5)])
def test_retry_after_is_capped_by_max_wait_and_garbage_ignored(clock, client, header, slept):
    c = client(Script(429, headers={"Retry-After": header}), retries=1, backoff=0.5, max_wait=5.0)
    c(torch.rand(1, 1, 2, 2))
    assert clock.sleeps == [slept]


def test_backoff_doubling_is_capped_by_max_wait(clock, client):
    client(Script(503, 503, 503, 503), retries=4, backoff=1.0, max_wait=3.0)(torch.rand(1, 1, 2, 2))
    assert clock.sleeps == [1.0, 2.0, 3.0, 3.0]


def npy_header(shape, dtype="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "not a .npy array"),
        (npy_header((2**40, 4)) + b"\0" * 16, "claims shape (1099511627776, 4)"),
        (npy_header((2, 2)) + b"\0" * 8, "the body holds 8"),
        (encode(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])), "not a plain numeric type"),
        (encode(np.zeros(2, dtype=np.complex64)), "not a plain numeric type"),
        (npy_header((2,), "|O") + b"\0" * 16, "not a plain numeric type"),
    ],
    ids=["empty", "2^40-rows", "truncated", "structured", "complex", "object"],
)
def test_decode_checks_the_header_against_the_body_before_allocating(body, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        decode(body)


def test_decode_refuses_an_npz_archive():
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="not a .npy array"):
        decode(buf.getvalue())


def test_replicas_share_the_batches_and_a_failing_one_is_retried_elsewhere(client):  # real time: the dead one pauses 1 s
    seen = []

    def serve(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "down.test":
            raise httpx.ConnectError("connection refused", request=request)
        x = decode(request.content)
        return httpx.Response(200, content=encode(x.reshape(len(x), -1)[:, :4]), headers={remote.OUTPUT_HEADER: "logits"})

    c = client(serve, url=["http://down.test/p", "http://up.test/p"], max_batch=2, retries=2, backoff=1.0)
    x = torch.rand(9, 1, 2, 2)
    assert torch.equal(c(x), x.reshape(9, -1))
    assert seen.count("down.test") == 1 and seen.count("up.test") == 5  # the dead replica pauses after failing
    assert (c.images, c.requests, c.retries, c.retried_images) == (9, 6, 1, 2)


def test_every_replica_down_is_one_line_naming_them_without_secrets(clock, client):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    c = client(refuse, url=["http://a.test/p?key=SECRET", "http://u:pw@b.test/p"], retries=3, backoff=0.1)
    with pytest.raises(BlackBoxError) as info:
        c(torch.rand(1, 1, 2, 2))
    assert str(info.value).startswith("black box at http://a.test/p, http://b.test/p failed after 4 attempts; "
                                      "last error: ConnectError: connection refused (at http://")
    assert "SECRET" not in str(info.value) and "pw" not in str(info.value)


def test_a_server_echoing_a_secret_has_it_scrubbed(clock, client):
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, text=f"bad key {request.url.params['key']} / {request.headers['authorization']}")

    with pytest.raises(BlackBoxError) as info:
        client(echo, headers={"Authorization": "Bearer TOKEN123"})(torch.rand(1, 1, 2, 2))
    assert "SECRET" not in str(info.value) and "TOKEN123" not in str(info.value) and "HTTP 403: bad key ***" in str(info.value)


class Hostile:
    """A raw HTTP server on 127.0.0.1 that reads a request and answers it badly, in `mode`:
    trickle (a 200 whose body comes 1 byte / 0.25 s), slow_headers (its headers do), endless (a 200 body
    without end), declared (a Content-Length of 10 GB). It stops on its own after `life` seconds."""

    def __init__(self, mode: str, life: float = 8.0):
        self.mode, self.life, self.sent = mode, life, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/predict"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        end = time.monotonic() + self.life
        self.sock.settimeout(self.life)
        with contextlib.suppress(OSError):
            while time.monotonic() < end:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._answer, args=(conn, end), daemon=True).start()

    def _answer(self, conn: socket.socket, end: float) -> None:
        with conn, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            length = int(re.search(rb"(?i)content-length: (\d+)", data).group(1))
            while len(data.split(b"\r\n\r\n", 1)[1]) < length:
                data += conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\nX-Output: logits\r\n"
            if self.mode == "slow_headers":
                for byte in head:
                    if time.monotonic() > end:
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(0.25)
            elif self.mode == "trickle":
                conn.sendall(head + b"Content-Length: 1000\r\n\r\n")
                while time.monotonic() < end:
                    conn.sendall(b"\0")
                    time.sleep(0.25)
            elif self.mode == "endless":
                conn.sendall(head + b"Connection: close\r\n\r\n")
                chunk = b"\0" * (1 << 20)
                while time.monotonic() < end:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            else:
                conn.sendall(head + b"Content-Length: 10000000000\r\n\r\n" + b"\0" * 65536)
                time.sleep(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["trickle", "slow_headers"])
def test_timeout_bounds_the_whole_request_against_a_trickling_server(clients, mode):
    server = Hostile(mode)
    c = HTTPClassifier(server.url, timeout=1.0, retries=1, backoff=0.0)
    clients.append(c)
    start = time.monotonic()
    try:
        with pytest.raises(BlackBoxError, match=r"failed after 2 attempts; last error: timed out after 1 s \(the whole request\)"):
            c(torch.rand(2, 1, 2, 2))
    finally:
        server.close()
    assert time.monotonic() - start < 4.0


@pytest.mark.parametrize("mode", ["endless", "declared"])
def test_an_answer_larger_than_batch_by_classes_is_refused_early(clients, mode):
    server = Hostile(mode)
    c = HTTPClassifier(server.url, timeout=5.0, retries=3, num_classes=10)
    clients.append(c)
    try:
        with pytest.raises(BlackBoxError, match=r"answered more than 4,256 bytes for a batch of 2 \(10 classes\); refused"):
            c(torch.rand(2, 1, 2, 2))
    finally:
        server.close()
    assert c.requests == 1 and server.sent < 64 << 20  # not retried; read stopped at the cap


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("classifier.url='http://u:pwSECRET@[::1/predict?k=SECRET'", "classifier.url is not a valid URL (Invalid port: ':1'): 'http://[::1/predict'"),
        ("classifier.url=['http://127.0.0.1:9/p','ftp://h/p']", "classifier=http needs classifier.url[1]=http(s)://...; got 'ftp://h/p'"),
        ("classifier.url=[]", "classifier.url=[] names no endpoint"),
        ("classifier.headers={Authorization: 'Bearer SECRET\u00e9'}", "classifier.headers['Authorization']: the value must be printable ASCII (character 13 is not)"),
        ("classifier.max_wait=inf", "classifier.max_wait=inf must be a finite number"),
    ],
    ids=["ipv6", "scheme-in-list", "empty-list", "non-ascii-header", "max-wait"],
)
def test_bad_http_settings_are_one_line_exit_2_without_secrets(tmp_path, capsys, override, needle):
    url = [] if "classifier.url" in override else ["classifier.url=http://127.0.0.1:9/p"]
    assert main(["certify", f"hydra.run.dir={tmp_path}", "classifier=http", *url, override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "SECRET" not in err, err
