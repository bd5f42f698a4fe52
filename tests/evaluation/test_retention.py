"""``mplus-eval retention`` (issue 20): the protocol on tiny in the default run, its scoring, its data and its CLI."""
import json

import pytest

from mplus_deploy.evaluation import retention
from mplus_deploy.evaluation.facts import builtin_facts, distractor_text, load_jsonl


def test_builtin_facts_are_seeded_made_up_and_answerable_from_the_context():
    a, b = builtin_facts(12, seed=3), builtin_facts(12, seed=3)
    assert a == b and a != builtin_facts(12, seed=4)
    assert len({f.answers[0] for f in a}) == 12  # distinct answers
    text = distractor_text().lower()
    for f in a:
        assert f.answers[0] in f.context and f.answers[0] not in f.question
        assert f.answers[0].lower() not in text  # no distractor gives the answer away


def test_hit_is_a_case_insensitive_substring_of_the_generated_text():
    assert retention.hit(" Quorbel the", ["quorbel"]) and retention.hit("xx Brand t", ["brand"])
    assert not retention.hit(" Polly", ["Tobias"]) and not retention.hit("anything", [" "])


def test_jsonl_set(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"context": "Ann has a cat.", "question": "Ann has a", "answers": ["cat"]}\n\n')
    assert load_jsonl(f)[0].answers == ("cat",)


@pytest.mark.parametrize("line,msg", [('{"context": "x", "question": "y"}', ":1: expected"), ("not json", "not valid JSON"),
                                      ('{"context": "x", "question": "y", "answers": [""]}', ":1: expected"), ("", "no facts")])
def test_jsonl_errors_name_the_line(tmp_path, line, msg):
    f = tmp_path / "s.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=msg):
        load_jsonl(f)


def test_protocol_on_tiny_counts_hits_at_each_n(serve_art):
    """On tiny (random weights) the counts are whatever they are; what is checked: one curve point per N, the
    stored answers are the engine's own greedy text on a session that memorized the same chunks, and a fact
    whose answer the model emits anyway is counted as a hit."""
    from mplus_deploy.runtime import Engine

    eng = Engine(serve_art, seed=0)
    facts = builtin_facts(3, seed=1)
    st = retention.Settings(distractors=(0, 1, 3), chunk_size=32, max_new_tokens=6, seed=0)
    res = retention.run(eng, facts, st, progress=False)
    assert set(res.hits) == {0, 1, 3} and res.facts == 3
    s = eng.session(seed=0)
    s.memorize(facts[0].context, chunk_size=32, progress=False)
    assert res.samples[0]["generated"][0] == s.generate(facts[0].question, 6, stop_at_eos=False)
    from mplus_deploy.evaluation.facts import Fact

    said = res.samples[0]["generated"][0]
    assert said.strip()
    echo = Fact(facts[0].context, facts[0].question, (said.strip()[:2],))  # what the model says at N=0 anyway
    never = Fact(facts[0].context, facts[0].question, ("\u20ac\u20ac",))  # a character the tokenizer cannot emit
    again = retention.run(eng, [echo, never], st, progress=False)
    assert again.hits[0] == 1 and again.rate[0] == 0.5
    with pytest.raises(ValueError, match="ascending"):
        retention.run(eng, facts, retention.Settings(distractors=(2, 1)), progress=False)
    eng.close()


def test_cli_writes_json_markdown_and_plot(serve_art, tmp_path, capsys):
    from mplus_deploy.cli.eval import main

    j, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    rc = main(["retention", str(serve_art), "--n-facts", "2", "--distractors", "0,1", "--chunk-size", "32",
               "--max-new-tokens", "4", "--json", str(j), "--markdown", str(md), "--plot", str(png), "-q"])
    assert rc == 0
    data = json.loads(j.read_text())
    assert set(data) == {"fp32"} and data["fp32"]["facts"] == 2 and set(data["fp32"]["rate"]) == {"0", "1"}
    assert "| fp32 |" in md.read_text() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["retention", str(serve_art), "--distractors", "3,1"]) == 2
    assert "ascending" in capsys.readouterr().err
    assert main(["retention", str(serve_art), "--quantized", "int4", "-q", "--n-facts", "1"]) == 2
    assert "int4" in capsys.readouterr().err
    assert main(["retention", str(serve_art), "--facts", str(tmp_path / "none.jsonl")]) == 2
