"""Defects found by review of mplus-serve, each pinned: concurrent downloads, requests waiting on one memory's
lock starving the others, chat-template errors, ids with a trailing newline, unknown users' memories, the
cardinality of the request metrics."""
import concurrent.futures as cf
import threading

import httpx

from tests.serve.conftest import LiveServer

H = {"Authorization": "Bearer k"}
ASK = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}


def test_concurrent_downloads_of_one_snapshot(live):
    srv, _ = live
    httpx.post(f"{srv.url}/v1/memory/dl/memorize", json={"text": "A snapshot to download many times over."},
               headers=H).raise_for_status()
    want = httpx.get(f"{srv.url}/v1/memory/dl/snapshot", headers=H).content

    def grab(_):
        with httpx.Client(headers=H, timeout=60) as c:
            return [c.get(f"{srv.url}/v1/memory/dl/snapshot") for _ in range(10)]

    with cf.ThreadPoolExecutor(16) as ex:
        got = [r for part in ex.map(grab, range(16)) for r in part]
    assert all(r.status_code == 200 and r.content == want for r in got)
    assert not list(srv.app.state.serve.store.tmp.iterdir())  # every link removed after its download


def test_requests_waiting_on_one_memory_do_not_starve_the_rest(live):
    srv, _ = live
    store = srv.app.state.serve.store
    lock = store.lock("busy")
    lock.acquire()
    waiting = []
    try:
        for _ in range(45):  # more than anyio's default 40 worker threads
            t = threading.Thread(target=lambda: waiting.append(httpx.post(
                f"{srv.url}/v1/memory/busy/memorize", json={"text": "wait for the lock please"}, headers=H, timeout=120)))
            t.start()
        r = httpx.post(f"{srv.url}/v1/completions", json=ASK, headers=H, timeout=20)  # a sync route of another memory
        assert r.status_code == 200
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    finally:
        lock.release()
    for _ in range(600):
        if len(waiting) == 45:
            break
        threading.Event().wait(0.1)
    assert len(waiting) == 45 and all(r.status_code == 200 for r in waiting)
    assert store.info("busy")["updates"] == 45


def test_chat_template_errors_are_400(serve_art, tmp_path):
    from mplus_deploy.runtime import Engine
    from tests.runtime.conftest import char_tokenizer

    tok = char_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    eng = Engine(serve_art, tokenizer=tok)
    srv = LiveServer(eng, tmp_path / "store", model_name="tiny")
    try:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "System role not supported" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    finally:
        srv.stop()
        eng.close()


def test_trailing_newline_ids_and_unknown_users(live):
    srv, eng = live
    assert httpx.post(f"{srv.url}/v1/memory/abc%0A/memorize", json={"text": "hello there"}, headers=H).status_code == 400
    assert httpx.post(f"{srv.url}/v1/completions", json={**ASK, "user": "x\n"}, headers=H).status_code == 400
    r = httpx.post(f"{srv.url}/v1/completions", json={**ASK, "user": "ghost"}, headers=H)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == eng.generate("hi", 2)
    store = srv.app.state.serve.store
    assert "ghost" not in store.resident() and store.info("ghost") is None  # nothing built or kept for it


def test_request_metrics_have_bounded_labels(live):
    srv, _ = live
    for i in range(5):
        httpx.get(f"{srv.url}/nope{i}", headers=H)
    text = httpx.get(f"{srv.url}/metrics", headers=H).text
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines() if line.startswith("mplus_requests_total{")}
    assert "other" in routes and not any(r.startswith("/nope") for r in routes)
