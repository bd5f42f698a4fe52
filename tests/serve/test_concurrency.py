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

    with cf.ThreadPoolExecutor(16) as ex:
        results = [x for part in ex.map(client, range(16)) for x in part]
    assert len(results) == 160
    for i, status, body in results:
        assert status == 200, body
        assert body["choices"][0]["text"] == want[i], (i, reqs[i])
    metrics = httpx.get(f"{srv.url}/metrics", headers=H).text
    assert 'mplus_time_to_first_token_seconds_count{endpoint="completions"} 160.0' in metrics
    assert "mplus_queue_depth 0.0" in metrics and 'mplus_memory_rows{kind="ltm",memory="u0"}' in metrics
