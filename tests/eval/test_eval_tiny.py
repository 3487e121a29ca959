"""`soulray eval` against the real server: the tiny export served twice by soulray's Serve app
(two model names, two route prefixes, one local Ray), contexts from a prepared run's val split,
and the tiny model as the judge too. Its answers are gibberish, so most are unscored: the test
checks they are all counted, never dropped."""

from __future__ import annotations

import json

import pytest
import yaml
from eval_checks import check_md_matches_json, check_pngs
from soulray_testing import ROOT, free_port
from typer.testing import CliRunner

from soulray.cli import app
from soulray.config import Config, load_config
from soulray.data.conversation import build_strategy_lookup, clean_conversation
from soulray.data.formats import detect_format, split_records, to_conversation
from soulray.data.parse import split_of
from soulray.eval.config import ContextsConfig
from soulray.eval.contexts import sample_contexts

pytestmark = pytest.mark.slow


def val_conversation_ids() -> set[str]:
    """The quickstart corpus's val split, recomputed here from the content hashes."""
    data = load_config(ROOT / "jobs" / "quickstart.yaml").data
    lookup = build_strategy_lookup(data.strategies)
    ids = set()
    for path in data.inputs:
        full = ROOT / path
        for raw in split_records(str(full), full.read_bytes()):
            conv = to_conversation(raw.record, detect_format(raw.record), raw.key)
            conv, _ = clean_conversation(conv, lookup, data.strategies.fallback)
            if split_of(conv.split_hash(), data.val_fraction) == "val":
                ids.add(conv.id)
    return ids


def test_a_per_turn_expanded_corpus_gives_each_reply_once(ray_local, tmp_path):
    """SoulChat's expanded form holds a dialogue once per reply, as the dialogue so far: like
    prepare, eval keeps the longest, so no reply is a context twice."""
    turns = [("user", "I can't sleep."), ("assistant", "Since when?")]
    turns += [("user", "A month."), ("assistant", "That is long."), ("user", "Yes.")]
    turns += [("assistant", "What keeps you up?")]
    samples = [turns[: k + 1] for k in (1, 3, 5)]  # one sample per reply
    other = [("user", "I failed my exam."), ("assistant", "I'm sorry. How do you feel?")]
    path = tmp_path / "expanded.jsonl"
    lines = [{"messages": [{"role": r, "content": c} for r, c in t]} for t in [*samples, other]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    contexts = sample_contexts(ContextsConfig(source="files", inputs=[str(path)], n=100))
    replies = sorted(c.reference for c in contexts)
    assert replies == sorted(["Since when?", "That is long.", "What keeps you up?", other[1][1]])
    with pytest.raises(ValueError, match="^eval.contexts.inputs entry '/nowhere.jsonl' matches no"):
        sample_contexts(ContextsConfig(source="files", inputs=["/nowhere.jsonl"]))


def test_records_prepare_would_reject_are_counted_not_dropped_silently(ray_local, tmp_path, caplog):
    """A context file's bad records were skipped without a word, and a file of nothing but
    bad ones said only "no conversation found"."""
    good = {"messages": [{"role": "user", "content": "I can't sleep."}]}
    good["messages"].append({"role": "assistant", "content": "Since when?"})
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(good) + '\n{"messages": [broken\n{"foo": 1}\n')
    with caplog.at_level("WARNING", logger="soulray.eval"):
        contexts = sample_contexts(ContextsConfig(source="files", inputs=[str(path)], n=100))
    assert [c.reference for c in contexts] == ["Since when?"]
    # soulray's own lines: a Ray Data thread may log into the capture too ("Exiting prefetcher's
    # background thread", which failed a fresh clone's run in stop 45)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("soulray")] == [
        'eval.contexts.inputs: 2 record(s) skipped, as prepare rejects them {"invalid_json": 1, '
        f'"unknown_format": 1}}; the first: {path}:2: invalid_json: Expecting value'
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    caplog.clear()
    with caplog.at_level("WARNING", logger="soulray.eval"), pytest.raises(ValueError) as e:
        sample_contexts(ContextsConfig(source="files", inputs=[str(bad)]))
    assert str(e.value) == (
        f"no conversation found in {[str(bad)]}; give files of a corpus format prepare reads "
        "(eval.contexts.inputs)"
    )
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("soulray")]
    assert ours[0].startswith("eval.contexts.inputs: 1 record(s) skipped")


def test_two_files_with_the_same_conversation_id_give_distinct_contexts(ray_local, tmp_path):
    """The gate pairs replies by context id: two conversations named "c1" (one per file) used
    to give two contexts "c1#1", and the later hid the earlier (3 paired items of 4)."""
    for name, reply in (("a", "Since when?"), ("b", "How long has it been?")):
        (tmp_path / name).mkdir()
        line = {"id": "c1", "messages": [{"role": "user", "content": f"I can't sleep ({name})."}]}
        line["messages"].append({"role": "assistant", "content": reply})
        (tmp_path / name / "data.jsonl").write_text(json.dumps(line) + "\n")
    inputs = [str(tmp_path / "a" / "data.jsonl"), str(tmp_path / "b" / "data.jsonl")]
    contexts = sample_contexts(ContextsConfig(source="files", inputs=inputs, n=100))
    assert sorted(c.id for c in contexts) == ["c1#1", "c1#1~2"]
    assert sorted(c.reference for c in contexts) == ["How long has it been?", "Since when?"]


def test_contexts_are_the_val_split_of_a_prepared_run(
    ray_local, prepared_quickstart, monkeypatch, tmp_path
):
    manifest = json.loads((prepared_quickstart / "manifest.json").read_text())
    assert manifest["inputs"][0].startswith("jobs/")  # relative to where prepare ran
    monkeypatch.chdir(tmp_path)  # eval started elsewhere still finds them (inputs_resolved)
    every = sample_contexts(
        ContextsConfig(source="prepared", prepared_dir=str(prepared_quickstart), n=10_000)
    )
    assert len(every) == manifest["splits"]["val"]["assistant_turns"]
    assert {c.conversation for c in every} == val_conversation_ids()
    first = every[0]
    assert first.messages[-1]["role"] == "user" and first.turn == len(first.messages)
    five = ContextsConfig(source="prepared", prepared_dir=str(prepared_quickstart), n=5, seed=1)
    sampled = sample_contexts(five)
    assert [c.id for c in sample_contexts(five)] == [c.id for c in sampled]  # seeded
    assert len(sampled) == 5 and {c.id for c in sampled} <= {c.id for c in every}
    with pytest.raises(ValueError, match="is not a `soulray prepare` output"):
        sample_contexts(ContextsConfig(source="prepared", prepared_dir=str(ROOT / "jobs")))


@pytest.fixture(scope="module")
def served_twice(ray_local, tmp_path_factory):
    """The tiny export as 'base' at / and as 'tuned' at /tuned, on one Serve instance."""
    from ray import serve

    from soulray.serve.app import build_application, start_serving
    from soulray.serve.tiny import build_tiny_export

    export = build_tiny_export(tmp_path_factory.mktemp("export"))
    port = free_port()

    def config(name: str) -> Config:
        engine = {"model_dir": str(export), "num_cpus": 0.4, "health_check_period_s": 1.0}
        serve_cfg = {"port": port, "model_name": name, "app_name": name, "engine": engine}
        return Config.model_validate({"serve": serve_cfg | {"ingress": {"num_cpus": 0.1}}})

    url = start_serving(config("base"))
    serve.run(build_application(config("tuned")), name="tuned", route_prefix="/tuned")
    yield {"base": f"{url}/v1", "tuned": f"{url}/tuned/v1"}
    serve.shutdown()


def test_tiny_models_and_tiny_judge_every_answer_counted(
    served_twice, prepared_quickstart, tmp_path
):
    def endpoint(name: str, max_tokens: int) -> dict:
        return {
            "base_url": served_twice[name],
            "model": name,
            "temperature": 0.0,
            "max_tokens": max_tokens,
            "max_retries": 1,
            "timeout_s": 120,
        }

    out = tmp_path / "report"
    cfg = {
        "eval": {
            "models": [
                {"name": "tuned", "endpoint": endpoint("tuned", 24)},
                {"name": "base", "endpoint": endpoint("base", 24)},
            ],
            "contexts": {"source": "prepared", "prepared_dir": str(prepared_quickstart), "n": 4},
            "judge": {"endpoint": endpoint("base", 48), "retries": 1, "rubric": "cpsycoune"},
            "output_dir": str(out),
        }
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["eval", "--config", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["contexts"]) == 4
    tuned, base = report["replies"]["tuned"], report["replies"]["base"]
    assert all(r["error"] is None and r["text"] is not None for r in tuned + base)
    # one export, greedy decoding, the same prompts: the two names answer identically
    assert [r["text"] for r in tuned] == [r["text"] for r in base]
    for model in ("tuned", "base"):
        judge = report["summary"]["turn"][model]["judge"]
        assert judge["judged"] == 4 == judge["scored"] + judge["unscored"]
        assert sum(judge["unscored_reasons"].values()) == judge["unscored"]
        assert set(judge["unscored_reasons"]) <= {"unparsed"}
        for row in report["replies"][model]:
            j = row["judge"]
            assert (j["scores"] is None) == ("error" in j)
            assert j["attempts"] == (1 if j["scores"] else 2)  # unusable: asked again once
    (pair,) = report["summary"]["pairwise"]
    assert pair["compared"] == 4 == pair["scored"] + pair["unscored"]
    assert report["meta"]["rubric"]["name"] == "cpsycoune"
    check_md_matches_json(report, (out / "report.md").read_text())
    check_pngs(out, ["reference_metrics.png", "reply_lengths.png"] + charts_with_scores(report))


def charts_with_scores(report: dict) -> list[str]:
    """The judge and pairwise charts exist only when the tiny judge scored something."""
    s = report["summary"]
    scored = any(v["judge"]["scored"] for v in s["turn"].values())
    return (["judge_scores.png"] if scored else []) + (
        ["pairwise.png"] if s["pairwise"][0]["scored"] else []
    )


def test_soulray_serve_takes_the_strategies_send_strategies_sends(served_twice, tmp_path):
    """The history's strategies reach the prompt (more prompt tokens: each earlier reply as
    "[Strategy] text", as trained), and eval's replies are the greedy answers to exactly that."""
    import openai

    corpus = [str(ROOT / "jobs" / "data" / "sample_en.jsonl")]
    contexts = {"source": "files", "inputs": corpus, "n": 3, "seed": 3}
    endpoint = {"base_url": served_twice["base"], "model": "base", "max_tokens": 8}
    cfg = {
        "eval": {
            "models": [{"name": "base", "endpoint": endpoint | {"send_strategies": True}}],
            "contexts": contexts,
            "output_dir": str(tmp_path / "report"),
        }
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["eval", "--config", str(tmp_path / "eval.yaml")])
    assert result.exit_code == 0, result.output
    replies = json.loads((tmp_path / "report" / "report.json").read_text())["replies"]["base"]
    client = openai.OpenAI(base_url=served_twice["base"], api_key="x")

    def ask(messages: list[dict]):
        return client.chat.completions.create(
            model="base", messages=messages, temperature=0.0, max_tokens=8
        )

    tagged_histories = 0
    for ctx, row in zip(sample_contexts(ContextsConfig(**contexts)), replies, strict=True):
        assert row["error"] is None
        tagged = ask(ctx.messages)
        assert row["text"] == (tagged.choices[0].message.content or "").strip()
        plain = ask([{"role": m["role"], "content": m["content"]} for m in ctx.messages])
        if any("strategy" in m for m in ctx.messages):
            assert tagged.usage.prompt_tokens > plain.usage.prompt_tokens
            tagged_histories += 1
    assert tagged_histories == 3
