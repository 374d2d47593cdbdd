"""The reference server (`deepzero-task serve`, a real process on 127.0.0.1) against hostile clients:
malformed bodies are a logged 400 (an input the classifier cannot take a 422), bodies are capped,
slow and idle connections are closed, connections past the limit do not starve /health, the bearer
token is checked, and SIGTERM is a clean exit even with a client trickling its body."""

from __future__ import annotations

import contextlib
import io
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from servers import Server, free_port

from deepzero_apps.blackbox import BlackBoxError, HTTPClassifier, encode
from deepzero_apps.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "tok-Secret-4242"
LIMITS = ("token=${oc.env:SERVE_TEST_TOKEN}", "request_timeout=2", "max_connections=16", "max_body_mb=1")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def _server(digits_model_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    s = Server(
        digits_model_file, free_port(), root / "requests.jsonl", LIMITS, {"SERVE_TEST_TOKEN": TOKEN}
    ).start()
    yield s
    s.kill()


@pytest.fixture
def server(_server):
    """The module's server (each start costs ~4 s of CPU); the SIGTERM test, last, stops it, and it is
    started again (same port and log) for a test that comes after it in the same process."""
    if _server.proc.poll() is not None:
        _server.start()
    return _server


def post(server: Server, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url, content=body, headers={**AUTH, **(headers or {})}, timeout=10)


def npy_header(shape, dtype="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((1, 1, 8, 8), dtype=np.float32))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"", 400, "not a .npy array"),
        (npz(), 400, "not a .npy array"),
        (encode(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])), 400, "not a plain numeric type"),
        (npy_header((2**40, 1, 8, 8)) + b"\0" * 256, 400, "claims shape (1099511627776, 1, 8, 8)"),
        (encode(np.zeros((2, 1, 8, 8), dtype=np.int64)), 400, "expected a float array (N, C, H, W)"),
        (encode(np.zeros((0, 1, 8, 8), dtype=np.float32)), 400, "of at least one image"),
        (encode(np.full((2, 1, 8, 8), np.nan, dtype=np.float32)), 400, "NaN or inf"),
        (encode(np.zeros((2, 3, 8, 8), dtype=np.float32)), 422, "the classifier cannot take this input"),
        (encode(np.zeros((2, 1, 9, 9), dtype=np.float32)), 422, "the classifier cannot take this input"),
    ],
    ids=["empty", "npz", "structured", "2^40-rows", "int", "no-images", "nan", "wrong-C", "wrong-HW"],
)
def test_a_malformed_body_is_a_client_error_logged_in_the_request_log(server, body, status, needle):
    before = len(server.rows())
    response = post(server, body)
    assert response.status_code == status and needle in response.text, response.text
    assert "Traceback" not in response.text
    assert server.rows()[before:] == [
        {"images": 0 if status == 400 else 2, "status": status, "seconds": server.rows()[-1]["seconds"]}
    ]


def test_the_bearer_token_is_checked_and_a_client_with_it_is_served(server):
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert post(server, encode(x), headers).status_code == 401
    assert server.rows()[-1]["status"] == 401
    without = HTTPClassifier(server.url, retries=0)
    with pytest.raises(BlackBoxError, match="refused the request: HTTP 401: missing or wrong bearer token"):
        without(torch.from_numpy(x))
    with_token = HTTPClassifier(server.url, headers=AUTH)
    try:
        assert with_token(torch.from_numpy(x)).shape == (3, 10)
    finally:
        without.close()
        with_token.close()
    assert server.rows()[-1] == {"images": 3, "status": 200, "seconds": server.rows()[-1]["seconds"]}


def raw(server: Server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def head(server: Server, length: int | None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n{size}\r\n"
    ).encode()


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing `sock`, or None if it is still open after `seconds`."""
    sock.settimeout(0.2)
    data, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece
    return None


def test_request_bodies_are_capped(server):
    sock = raw(server, head(server, 1_500_000_000))  # a 1.5 GB body announced
    assert (closed_within(sock, 5) or b"").startswith(b"HTTP/1.1 413")
    sock = raw(server, head(server, None))  # a chunked body with no length, 64 KiB chunks
    chunk = b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"
    with contextlib.suppress(OSError):
        for _ in range(40):  # 2.5 MiB > max_body_mb=1
            sock.sendall(chunk)
    assert (closed_within(sock, 5) or b"").startswith(b"HTTP/1.1 413")
    assert [r["status"] for r in server.rows()[-2:]] == [413, 413]


def test_slow_and_idle_connections_are_closed_and_do_not_starve_health(server):
    idle = [raw(server) for _ in range(100)]  # past max_connections=16: the oldest idle ones are closed
    slow_headers = raw(server, b"POST /predict HTTP/1.1\r\n")
    slow_body = raw(server, head(server, 1000) + b"\x93NUMPY")
    try:
        start = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 2
        assert closed_within(slow_headers, 6) == b""  # request_timeout=2: closed without an answer
        assert (closed_within(slow_body, 6) or b"").startswith(b"HTTP/1.1 408")
        assert all(closed_within(s, 1) is not None for s in idle)
    finally:
        for s in (*idle, slow_headers, slow_body):
            s.close()
    assert server.rows()[-1]["status"] == 408
    x = torch.rand(5, 1, 8, 8)
    client = HTTPClassifier(server.url, headers=AUTH)
    before = server.images()
    try:
        assert client(x).shape == (5, 10) and server.images() == before + 5
    finally:
        client.close()


def test_a_request_log_that_is_a_directory_is_refused_in_one_line(digits_model_file, tmp_path, capsys):
    code = main(
        [
            "serve",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"classifier.path={digits_model_file}",
            f"request_log={tmp_path}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"request_log='{tmp_path}' is a directory" in err and len(err.splitlines()) == 1, err


def test_binding_other_machines_without_a_token_warns_in_one_line(
    digits_model_file, tmp_path, capsys, monkeypatch
):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # nothing is bound: only the warning is checked
    assert (
        main(["serve", f"hydra.run.dir={tmp_path}", f"classifier.path={digits_model_file}", "host=0.0.0.0"])
        == 0
    )
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "host=0.0.0.0 accepts other machines and no token is set" in warning[0]


def test_two_replicas_one_killed_mid_call_answer_everything_once(server, digits_model_file, tmp_path):
    a = server  # the module's server (token and limits) is one replica: its rows from here on count
    since = a.mark()
    b = Server(digits_model_file, free_port(), tmp_path / "b.jsonl").start()
    client = HTTPClassifier([a.url, b.url], max_batch=4, retries=3, backoff=0.05, headers=AUTH)
    x = torch.rand(400, 1, 8, 8)

    def kill_b_once_it_served() -> None:
        end = time.monotonic() + 60
        while len(b.rows()) < 5 and time.monotonic() < end:
            time.sleep(0.01)
        b.kill()

    killer = threading.Thread(target=kill_b_once_it_served)
    killer.start()
    try:
        out = client(x)
    finally:
        killer.join()
        client.close()
        b.kill()
    expected = torch.jit.load(str(digits_model_file))(x)
    assert torch.allclose(out, expected, atol=1e-5)
    # 100 chunks, each answered once
    assert client.images == 400 and client.retries >= 1 and client.requests - client.retries == 100
    # B may have logged the request it died answering, which is then bought again from A (nothing can tell)
    assert 5 <= b.images() < 400 and a.images(since) + b.images() - 400 in (0, 4)


def test_sigterm_is_a_clean_exit_even_with_a_client_trickling_its_body(server):
    """Last in the module: SIGTERM stops the module's server, after everything above (or nothing, run
    alone), with a client trickling its body; it reports the images the model got, its log's count."""
    trickle = raw(server, head(server, 1000))
    try:
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=20)
    finally:
        trickle.close()
    out, images = server.output(), sum(r["images"] for r in server.rows(server.first_row))
    assert code == 0 and f"serve: stopped after {images:,} images" in out and "Traceback" not in out, out
