"""The real ``openai`` client against mplus-serve: models, completions, chat and streaming, each answer equal
to ``Engine.generate`` on the same memory, prompt ids and sampling parameters."""
import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from mplus_deploy.model.sampling import SamplingParams  # noqa: E402

DOC = "The key of the lighthouse is under the blue mat in the hall. Nobody else knows it. " * 2


def _client(srv, key="k"):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)


def _expected(eng, ids, memorized: str | None, **sampling) -> str:
    s = eng.session(seed=0)
    if memorized:
        s.memorize(memorized)
    return s.generate(ids, params=SamplingParams(**sampling))


def test_models_completion_and_chat_equal_the_engine(live):
    srv, eng = live
    c = _client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="Where is the key?", max_tokens=12, temperature=0)
    ids = eng.codec.encode_prompt("Where is the key?")
    assert r.choices[0].text == eng.generate(ids, 12)  # no user: the artifact's initial memory, greedy
    assert r.usage.prompt_tokens == ids.numel() and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == ids.numel() + 12 and r.choices[0].finish_reason == "length"

    httpx.post(f"{srv.url}/v1/memory/alice/memorize", json={"text": DOC}, headers={"Authorization": "Bearer k"}).raise_for_status()
    r = c.completions.create(model="tiny", prompt="Where is the key?", max_tokens=10, temperature=0.8, top_p=0.9,
                             seed=7, user="alice")
    want = _expected(eng, ids, DOC, max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    assert r.choices[0].text == want
    other = c.completions.create(model="tiny", prompt="Where is the key?", max_tokens=10, temperature=0.8, top_p=0.9,
                                 seed=7)  # the same request without the memory answers from the initial one
    assert other.choices[0].text == _expected(eng, ids, None, max_new_tokens=10, do_sample=True, temperature=0.8,
                                              top_p=0.9, seed=7)

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the key?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=9, temperature=0, user="alice")
    chat_ids = eng.codec.encode_chat(msgs)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _expected(eng, chat_ids, DOC, max_new_tokens=9)
    assert r.usage.prompt_tokens == chat_ids.numel()


def test_streaming_equals_the_whole_answer_and_uses_openai_chunks(live):
    srv, eng = live
    c = _client(srv)
    kw = dict(model="tiny", max_tokens=14, temperature=0)
    whole = c.completions.create(prompt="Once upon", **kw).choices[0].text
    chunks = list(c.completions.create(prompt="Once upon", stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole and chunks[-1].usage.completion_tokens == 14
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    msgs = [{"role": "user", "content": "Tell me"}]
    whole = c.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    parts = list(c.chat.completions.create(messages=msgs, stream=True, **kw))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole


def test_stop_strings_and_token_id_prompts(live):
    srv, eng = live
    c = _client(srv)
    full = c.completions.create(model="tiny", prompt=[5, 9, 11, 40], max_tokens=20, temperature=0).choices[0].text
    assert full == eng.generate(torch.tensor([5, 9, 11, 40]), 20)
    at = next(i for i in range(2, len(full) - 1) if full[i:i + 2].strip() == full[i:i + 2] and full[i:i + 2])
    stop = full[at:at + 2]  # two visible characters from inside the greedy text
    r = c.completions.create(model="tiny", prompt=[5, 9, 11, 40], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.timeout(300)
def test_demo_server_answers_from_a_users_memory(tmp_path):
    """The demo (SmolLM2-135M backbone with its trained M+ memory) behind the server, on the torch backend: what
    alice memorized comes back to alice's question, and not to bob, who never told it."""
    from pathlib import Path

    from mplus_deploy.runtime import Engine
    from tests.serve.conftest import LiveServer

    fact = (Path(__file__).resolve().parents[2] / "docs" / "examples" / "fact.txt").read_text()
    q = "Edda kept a blue parrot named"
    eng = Engine("demo", backend="torch", seed=0)
    srv = LiveServer(eng, tmp_path / "store", model_name="demo")
    try:
        httpx.post(f"{srv.url}/v1/memory/alice/memorize", json={"text": fact}).raise_for_status()
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="demo", prompt=q, max_tokens=8, temperature=0, user="alice")
        assert "Tobias" in r.choices[0].text, r.choices[0].text
        mine = eng.session(seed=0)
        mine.memorize(fact, progress=False)
        assert r.choices[0].text == mine.generate(q, 8)
        r = c.completions.create(model="demo", prompt=q, max_tokens=8, temperature=0, user="bob")
        assert "Tobias" not in r.choices[0].text and r.choices[0].text == eng.generate(q, 8)
        r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi!"}], max_tokens=6,
                                      temperature=0)
        assert r.choices[0].message.content == eng.generate(eng.codec.encode_chat([{"role": "user", "content": "Hi!"}]), 6)
    finally:
        srv.stop()
        eng.close()
