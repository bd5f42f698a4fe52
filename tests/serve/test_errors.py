"""Bad requests: OpenAI-style error JSON with the right status (400, 401, 404, 413, 429), never a traceback, and
no memory changed by a rejected request."""
import time

import httpx
import pytest

from tests.serve.conftest import LiveServer

H = {"Authorization": "Bearer k"}
ASK = {"model": "tiny", "prompt": "hi", "max_tokens": 3}


def _err(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"] and "Traceback" not in r.text
    return e


def test_auth(live):
    srv, _ = live
    assert httpx.get(f"{srv.url}/health").status_code == 200  # open
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                         ("POST", "/v1/memory/a/memorize"), ("GET", "/v1/memory/a/snapshot")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
            e = _err(httpx.request(method, f"{srv.url}{path}", headers=headers, json=ASK), 401)
            assert e["code"] == "invalid_api_key"
    assert httpx.get(f"{srv.url}/v1/models", headers=H).status_code == 200


@pytest.mark.parametrize("mid", ["-lead", "a b", "x" * 129, "semi;colon", "uni\u00e9", "dot..%2F..%2Fetc", "a%00b"])
def test_bad_memory_ids(live, mid):
    srv, _ = live
    _err(httpx.post(f"{srv.url}/v1/memory/{mid}/memorize", json={"text": "hello there"}, headers=H), 400)
    _err(httpx.get(f"{srv.url}/v1/memory/{mid}", headers=H), 400)
    _err(httpx.post(f"{srv.url}/v1/completions", json={**ASK, "user": mid.replace("%2F", "/")}, headers=H), 400)
    assert not list((srv.app.state.serve.store.snapshots).iterdir())


@pytest.mark.parametrize("body,status,param", [
    ({**ASK, "max_tokens": -1}, 400, "max_tokens"), ({**ASK, "temperature": 3}, 400, "temperature"),
    ({**ASK, "top_p": 0}, 400, "top_p"), ({**ASK, "n": 2}, 400, "n"), ({**ASK, "logprobs": 3}, 400, "logprobs"),
    ({**ASK, "echo": True}, 400, "echo"), ({"model": "tiny"}, 400, "prompt"), ({**ASK, "model": "gpt-4"}, 404, "model"),
    ({**ASK, "prompt": "x" * 70}, 400, "prompt"), ({**ASK, "prompt": [5, 999]}, 400, "prompt"),
    ({**ASK, "prompt": ""}, 400, "prompt"), ({**ASK, "stop": [""]}, 400, "stop"),
    ({**ASK, "max_tokens": 100}, 400, "prompt"),
])
def test_bad_completion_fields(live, body, status, param):
    srv, _ = live
    e = _err(httpx.post(f"{srv.url}/v1/completions", json=body, headers=H), status)
    assert e["param"] == param


def test_bad_chat_and_json(live):
    srv, _ = live
    _err(httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=H), 400)
    _err(httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
                    headers=H), 400)
    _err(httpx.post(f"{srv.url}/v1/completions", content=b"{not json", headers={**H, "content-type": "application/json"}), 400)


def test_rejected_memory_requests_change_nothing(live):
    srv, _ = live
    u = f"{srv.url}/v1/memory/eve"
    assert httpx.post(f"{u}/memorize", json={"text": "Eve owns a silver bicycle and a grey cat."}, headers=H).status_code == 200
    before = httpx.get(f"{u}/snapshot", headers=H).content
    for body in ({"text": "a", "ids": [1]}, {}, {"text": "   "}, {"ids": []}, {"ids": [1, 256]}, {"ids": [-1]},
                 {"text": "ok", "chunk_size": 0}, {"text": "ok", "extra": 1}):
        _err(httpx.post(f"{u}/memorize", json=body, headers=H), 400)
    _err(httpx.put(f"{u}/snapshot", content=b"not a snapshot", headers=H), 400)
    _err(httpx.put(f"{u}/snapshot", content=before[: len(before) // 2], headers=H), 400)
    _err(httpx.put(f"{u}/snapshot", content=b"", headers=H), 400)
    assert httpx.get(f"{u}/snapshot", headers=H).content == before
    assert httpx.get(u, headers=H).json()["version"] == 1
    _err(httpx.get(f"{srv.url}/v1/memory/nobody", headers=H), 404)
    _err(httpx.delete(f"{srv.url}/v1/memory/nobody", headers=H), 404)
    _err(httpx.get(f"{srv.url}/v1/memory/nobody/snapshot", headers=H), 404)


def test_oversize_bodies_and_a_full_queue(serve_art, tmp_path):
    from mplus_deploy.runtime import Engine

    eng = Engine(serve_art, seed=0)
    srv = LiveServer(eng, tmp_path / "store", max_body=1000, max_queue=2, model_name="tiny")
    try:
        big = {"text": "x" * 2000}
        _err(httpx.post(f"{srv.url}/v1/memory/f/memorize", json=big), 413)

        def chunked():
            yield b'{"text": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        _err(httpx.post(f"{srv.url}/v1/memory/f/memorize", content=chunked(), headers={"content-type": "application/json"}), 413)
        assert srv.app.state.serve.store.info("f") is None
        gate = srv.app.middleware_stack.app  # ServerErrorMiddleware -> Gate
        while not hasattr(gate, "in_flight"):
            gate = gate.app
        for _ in range(500):  # the earlier requests leave the gate after their response is sent
            if gate.in_flight == 0:
                break
            time.sleep(0.01)
        gate.in_flight = 2  # two requests in progress
        e = _err(httpx.post(f"{srv.url}/v1/completions", json=ASK), 429)
        assert e["code"] == "queue_full"
        assert httpx.get(f"{srv.url}/health").status_code == 200  # not queued
        gate.in_flight = 0
        assert httpx.post(f"{srv.url}/v1/completions", json=ASK).status_code == 200
    finally:
        srv.stop()
        eng.close()
