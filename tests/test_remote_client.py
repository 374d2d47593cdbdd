"""HTTPClassifier against a scripted transport: wire format, batching, retries, backoff, rate limit, errors."""

from __future__ import annotations

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
    """Fake time for remote: sleeps advance it and are recorded."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(remote, "time", fake)
    return fake


def client(script: Script, **kwargs) -> HTTPClassifier:
    return HTTPClassifier(URL, transport=httpx.MockTransport(script), **kwargs)


def test_batches_are_split_and_answers_decoded_exactly(clock):
    script, x = Script(), torch.rand(7, 1, 2, 2)
    out = client(script, max_batch=3)(x)
    assert torch.equal(out, x.reshape(7, -1) * 2) and script.sizes == [(3, 200), (3, 200), (1, 200)]


def test_retries_with_exponential_backoff_count_apart_from_images(clock):
    script = Script(503, 429, 500)
    c = client(script, retries=3, backoff=0.5)
    c(torch.rand(5, 1, 2, 2))
    assert clock.sleeps == [0.5, 1.0, 2.0]
    assert (c.images, c.retries, c.retried_images) == (5, 3, 15)
    assert c.state_dict() == {"retries": 3, "retried_images": 15}


def test_retry_after_is_honoured_when_longer(clock):
    c = client(Script(429, headers={"Retry-After": "7"}), retries=1, backoff=0.5)
    c(torch.rand(1, 1, 2, 2))
    assert clock.sleeps == [7.0]


def test_down_after_retries_is_one_line_naming_the_url_without_secrets(clock):
    c = client(Script(502, 502, 502), retries=2, backoff=0.0)
    with pytest.raises(BlackBoxError) as info:
        BlackBoxClassifier(c, name="classifier")(torch.rand(2, 1, 2, 2))
    message = str(info.value)
    assert message == ("black box at http://example.test:8000/predict failed after 3 attempts; "
                       "last error: HTTP 502: status 502")
    assert "SECRET" not in message and "pw" not in message


def test_connection_errors_are_retried_then_reported(clock):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    c = HTTPClassifier(URL, transport=httpx.MockTransport(refuse), retries=1, backoff=0.1)
    with pytest.raises(BlackBoxError, match="after 2 attempts; last error: ConnectError: connection refused"):
        c(torch.rand(1, 1, 2, 2))
    assert c.retries == 1 and c.images == 0


def test_client_errors_fail_at_once(clock):
    script = Script(400)
    with pytest.raises(BlackBoxError, match="refused the request: HTTP 400: status 400"):
        client(script, retries=5)(torch.rand(1, 1, 2, 2))
    assert len(script.sizes) == 1


def test_output_kind_must_match_the_server(clock):
    with pytest.raises(BlackBoxError, match="returns probs, but classifier.output=logits"):
        client(Script(kind="probs"))(torch.rand(1, 1, 2, 2))


def test_rate_limit_spaces_requests(clock):
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
