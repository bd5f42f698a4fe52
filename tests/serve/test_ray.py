"""``mplus-serve --ray`` on a local Ray instance (loopback, 2 replicas): the ``openai`` client works against the
Ray endpoint, requests for one memory id always see that memory, and killing the replica that served it loses
no acknowledged memorize. Bounded: one Ray start for the module, every wait has a deadline."""
import time

import httpx
import pytest

ray = pytest.importorskip("ray")  # the optional [ray] extra (part of [dev]: CI runs this)
openai = pytest.importorskip("openai")

from tests.serve.conftest import free_port  # noqa: E402

# three times each: enough chunks that the tiny model's greedy answer tells the three memories apart (checked)
FACT = "The lighthouse keeper of Orlen Point counts seventeen gulls on the rail every morning. " * 3
MORE = "On stormy nights she lights a second lamp in the eastern window. " * 3
PROMPT = "The keeper counts"


@pytest.fixture(scope="module")
def ray_server(serve_art, tmp_path_factory):
    from ray import serve

    from mplus_deploy.serve.ray_app import ReplicaConfig, run

    store = tmp_path_factory.mktemp("ray") / "store"
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cfg = ReplicaConfig(str(serve_art), str(store), engine={"threads": 1},
                            app={"api_key": "k", "model_name": "tiny"})
        run(cfg, replicas=2, host="127.0.0.1", port=port, max_resident=4, address=None, replica_cpus=0.5,
            blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray Serve application did not come up within 120 s")
            time.sleep(0.5)
        yield url, store
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(serve_art):
    """The answers of one in-process Engine: the initial memory, after FACT, after FACT + MORE."""
    from mplus_deploy.runtime import Engine

    eng = Engine(serve_art)
    out = {"initial": eng.session(seed=0).generate(PROMPT, 8)}
    s = eng.session(seed=0)
    s.memorize(FACT)
    out["fact"] = s.generate(PROMPT, 8)
    s.memorize(MORE)
    out["both"] = s.generate(PROMPT, 8)
    eng.close()
    assert len(set(out.values())) == 3  # the memories are told apart by the answer
    return out


def _ask(client, user):
    raw = client.completions.with_raw_response.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                                      user=user)
    return raw.parse().choices[0].text, raw.headers.get("x-mplus-replica")


def _memorize(url, mid, text, deadline_s=60.0):
    """POST a memorize until it is acknowledged (a request in flight on a replica being killed may fail: it was
    then not acknowledged, and the client retries it, as any client of a replicated service does)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            r = httpx.post(f"{url}/v1/memory/{mid}/memorize", json={"text": text},
                           headers={"Authorization": "Bearer k"}, timeout=60)
            if r.status_code == 200:
                return r.json(), r.headers.get("x-mplus-replica")
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"memorize of {mid!r} not acknowledged within {deadline_s} s")
        time.sleep(0.5)


def test_openai_client_and_memory_routing(ray_server, reference):
    url, _ = ray_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert _ask(client, "alice")[0] == reference["initial"]
    ack, _ = _memorize(url, "alice", FACT)
    assert ack["version"] == 1
    replicas = set()
    for _ in range(8):  # every request for alice sees alice's memory, whichever replica answers
        text, rep = _ask(client, "alice")
        assert text == reference["fact"]
        replicas.add(rep)
    assert _ask(client, "bob")[0] == reference["initial"]  # another id: not alice's memory
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=6, temperature=0, user="alice", stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=6, temperature=0, user="alice")
    assert streamed == whole.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_killing_a_replica_loses_nothing_acknowledged(ray_server, reference):
    from ray import serve  # noqa: F401 - Serve's actors live in the "serve" namespace

    url, _ = ray_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
    _, rep = _memorize(url, "carol", FACT)
    assert _ask(client, "carol")[0] == reference["fact"]
    ray.kill(ray.get_actor(rep, namespace="serve"), no_restart=False)  # the replica that acknowledged it
    _memorize(url, "carol", MORE)  # served by the survivor (or the restarted one) from the store
    deadline = time.monotonic() + 60
    while True:
        try:
            text, _ = _ask(client, "carol")
            break
        except (openai.APIError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert text == reference["both"]  # both acknowledged memorizes are there
    r = httpx.get(f"{url}/v1/memory/carol", headers={"Authorization": "Bearer k"}, timeout=30)
    assert r.status_code == 200 and r.json()["updates"] == 2
