"""16 concurrent clients x 10 requests on mixed memories: no errors, and every answer equals the one the same
request gets alone (the engine on that memory, same ids and sampling)."""
import concurrent.futures as cf
import random

import httpx

from mplus_deploy.model.sampling import SamplingParams

H = {"Authorization": "Bearer k"}
USERS = [None, "u0", "u1", "u2"]
DOCS = {"u0": "Anna keeps the red key in the kitchen drawer. " * 2, "u1": "Bruno hid the map under the stairs. " * 2,
        "u2": "Chen's password is written on a yellow note. " * 2}
PROMPTS = ["Where is it?", "Who has the key?", "Tell me about the map", "What colour?"]


def test_sixteen_clients_get_the_serial_answers(live):
    srv, eng = live
    _sixteen_clients(srv, eng)


def _sixteen_clients(srv, eng, during=None):
    """160 requests from 16 clients; ``eng`` (its own sessions) gives the serial answers; ``during()`` runs beside."""
    for u, d in DOCS.items():
        httpx.post(f"{srv.url}/v1/memory/{u}/memorize", json={"text": d}, headers=H).raise_for_status()
    rng = random.Random(3)
    reqs = []
    for _ in range(160):
        user, prompt = rng.choice(USERS), rng.choice(PROMPTS)
        sampled = rng.random() < 0.5
        body = {"model": "tiny", "prompt": prompt, "max_tokens": rng.randint(2, 10), "user": user,
                "temperature": 0.7 if sampled else 0, "seed": rng.randint(0, 99)}
        reqs.append({k: v for k, v in body.items() if v is not None})
    sessions = {}
    for u in USERS:
        s = eng.session(seed=0)
        if u:
            s.memorize(DOCS[u])
        sessions[u] = s

    def expected(b):
        greedy = b["temperature"] == 0
        sp = SamplingParams(max_new_tokens=b["max_tokens"], do_sample=not greedy, temperature=1.0 if greedy else 0.7,
                            seed=b["seed"])
        return sessions[b.get("user")].generate(b["prompt"], params=sp)

    want = [expected(b) for b in reqs]

    def client(k):
        out = []
        with httpx.Client(timeout=60, headers=H) as c:
            for i in range(k * 10, k * 10 + 10):
                r = c.post(f"{srv.url}/v1/completions", json=reqs[i])
                out.append((i, r.status_code, r.json()))
        return out

    with cf.ThreadPoolExecutor(17) as ex:
        side = ex.submit(during) if during else None
        results = [x for part in ex.map(client, range(16)) for x in part]
        if side:
            side.result()
    assert len(results) == 160
    for i, status, body in results:
        assert status == 200, body
        assert body["choices"][0]["text"] == want[i], (i, reqs[i])
    metrics = httpx.get(f"{srv.url}/metrics", headers=H).text
    assert 'mplus_time_to_first_token_seconds_count{endpoint="completions"} 160.0' in metrics
    assert "mplus_queue_depth 0.0" in metrics and 'mplus_memory_rows{kind="ltm",memory="u0"}' in metrics


def test_continuous_batching_gives_the_serial_answers_while_users_memorize(serve_art, tmp_path):
    """The server on an engine that batches decode steps (max_batch 4): the same 160 answers as an unbatched engine
    alone, while another client memorizes into four other users' memories; those memories then answer as the
    unbatched engine does after the same memorize calls."""
    from mplus_deploy.runtime import Engine

    from .conftest import LiveServer

    eng, ref = Engine(serve_art, seed=0, max_batch=4), Engine(serve_art, seed=0)
    srv = LiveServer(eng, tmp_path / "store", api_key="k", model_name="tiny")
    extra = {f"m{i}": f"Note {i}: the spare key hangs behind door number {i}. " * 3 for i in range(4)}

    def memorize_meanwhile():
        with httpx.Client(timeout=60, headers=H) as c:
            for u, d in extra.items():
                c.post(f"{srv.url}/v1/memory/{u}/memorize", json={"text": d}).raise_for_status()

    try:
        _sixteen_clients(srv, ref, during=memorize_meanwhile)
        st = eng.describe()["batch"]
        assert st["calls"] > 0 and st["mean_batch"] > 1.5 and st["active"] == 0, st
        for u, d in extra.items():
            s = ref.session(seed=0)
            s.memorize(d)
            r = httpx.post(f"{srv.url}/v1/completions", headers=H,
                           json={"model": "tiny", "prompt": "Where is the key?", "max_tokens": 8, "user": u,
                                 "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == s.generate("Where is the key?", 8), u
    finally:
        srv.stop()
        eng.close()
        ref.close()
