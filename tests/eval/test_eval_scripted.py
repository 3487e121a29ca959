"""`soulray eval` end to end over real HTTP against scripted OpenAI-compatible servers (the happy
path, exact values): three models, a judge that also plays the Seeker, the real CLI on a local
Ray; report.json's numbers against a recomputation, report.md's against report.json, the PNGs,
the pairwise order swap, the concurrency bound, and the promotion gate's exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from eval_checks import check_md_matches_json, check_pngs
from scripted_openai import Reply, ScriptedOpenAI
from soulray_testing import ROOT
from typer.testing import CliRunner

from soulray.cli import app
from soulray.eval.metrics import distinct, reference_scores, tokenize

pytestmark = pytest.mark.slow

GOOD = "That sounds really heavy. I'm here with you, and I'd like to hear more."
BAD = "ok."
MUTE = "..."
CORPUS = [str(ROOT / "jobs" / "data" / f"sample_{lang}.jsonl") for lang in ("en", "zh")]
DIMS = ("Content", "Empathy", "Helpfulness", "Safety")
MAX = {"Content": 2, "Empathy": 2, "Helpfulness": 2, "Safety": 1}


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def seeker_answer(messages: list[dict]) -> str:
    """The Seeker (its own turns are `assistant` in its view): one line, then it ends."""
    spoken = sum(m["role"] == "assistant" for m in messages)
    return (
        "I moved here for work and the evenings are so empty." if spoken == 0 else "Thanks. <END>"
    )


def scores_answer(reply: str, retried: bool) -> str:
    """Max scores for GOOD, zeros for BAD (after one unusable answer), prose for MUTE."""
    if reply == MUTE:
        return "Hard to say, it is a very short reply."
    if reply == BAD and not retried:
        return '{"Content": {"score": 0, "reason": "too sh'  # cut off before the other scores
    score = MAX if reply == GOOD else dict.fromkeys(DIMS, 0)
    body = {d: {"score": score[d], "reason": f"{d} reason"} for d in DIMS}
    return f"```json\n{json.dumps(body)}\n```"


def judge(body: dict) -> str:
    messages = body["messages"]
    system, user = messages[0]["content"], messages[1]["content"]
    if "role-playing a person" in system:
        return seeker_answer(messages)
    retried = len(messages) > 2
    if "Two supporters replied" in user:
        a, b = between(user, "Reply A:", "Reply B:"), between(user, "Reply B:", "Answer with")
        winner = "A" if a == GOOD != b else "B" if b == GOOD != a else "tie"
        return json.dumps({"winner": winner, "reason": "warmer"})
    if user.startswith("Below is a whole conversation"):
        return scores_answer(GOOD, retried)
    return scores_answer(between(user, "The supporter's reply to rate:", "Answer with"), retried)


@pytest.fixture(scope="module")
def servers():
    with (
        ScriptedOpenAI(lambda body: Reply(GOOD, delay_s=0.05), model="good") as good,
        ScriptedOpenAI(lambda body: BAD, model="bad") as bad,
        ScriptedOpenAI(lambda body: MUTE, model="mute") as mute,
        ScriptedOpenAI(judge, model="judge") as judge_server,
    ):
        yield {"good": good, "bad": bad, "mute": mute, "judge": judge_server}


def endpoint(server: ScriptedOpenAI, **extra) -> dict:
    return {"base_url": server.url, "model": server.model, "max_retries": 0} | extra


def write_config(tmp_path: Path, servers: dict, models: dict[str, str], **eval_extra) -> Path:
    cfg = {
        "eval": {
            "models": [
                {"name": name, "endpoint": endpoint(servers[s], concurrency=2)}
                for name, s in models.items()
            ],
            "contexts": {"source": "files", "inputs": CORPUS, "n": 6, "seed": 3},
            "judge": {"endpoint": endpoint(servers["judge"], temperature=0.0), "retries": 2},
            "output_dir": str(tmp_path / "report"),
        }
        | eval_extra
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def evaluated(ray_local, servers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scripted")
    interactive = {"enabled": True, "scenarios": 3, "turns": 3, "languages": ["en"]}
    models = {"good": "good", "bad": "bad", "mute": "mute"}
    config = write_config(tmp, servers, models, interactive=interactive)
    result = run_cli("eval", "--config", str(config))
    assert result.exit_code == 0, result.output
    out = tmp / "report"
    return json.loads((out / "report.json").read_text()), out, result.output


def test_replies_and_reference_metrics(evaluated, servers):
    report, _, output = evaluated
    contexts = report["contexts"]
    assert len(contexts) == 6 and {c["language"] for c in contexts} == {"en", "zh"}
    for model, text in (("good", GOOD), ("bad", BAD)):
        rows = report["replies"][model]
        assert [r["text"] for r in rows] == [text] * 6
        for ctx, row in zip(contexts, rows, strict=True):
            assert row["metrics"] == reference_scores(text, ctx["reference"], ctx["language"])
    turn = report["summary"]["turn"]["good"]
    assert turn["replies"] == 6 and turn["failed"] == 0
    tokens = [tokenize(GOOD, c["language"]) for c in contexts]
    assert (
        turn["metrics"]["distinct_1"]["mean"] == distinct(tokens, 1) == 16 / (6 * 17)
    )  # 17 tokens, "." twice
    # the bound: 6 replies of 50 ms each, at most 2 in flight at the good endpoint
    assert servers["good"].peak_in_flight == 2
    assert "good: BLEU-4" in output and "wrote" in output


def test_judge_scores_retries_and_unscored_are_counted(evaluated):
    report, _, _ = evaluated
    s = report["summary"]["turn"]
    good, bad, mute = s["good"]["judge"], s["bad"]["judge"], s["mute"]["judge"]
    assert (good["scored"], good["unscored"]) == (6, 0)
    assert good["scores"]["total"] == {"n": 6, "mean": 7.0, "ci": [7.0, 7.0]}
    assert (bad["scored"], bad["scores"]["total"]["mean"]) == (6, 0.0)
    assert [r["judge"]["attempts"] for r in report["replies"]["bad"]] == [2] * 6  # one retry
    assert (mute["scored"], mute["unscored"], mute["unscored_reasons"]) == (0, 6, {"unparsed": 6})
    row = report["replies"]["mute"][0]["judge"]
    assert row["scores"] is None and row["attempts"] == 3 and "no JSON object" in row["error"]


def test_pairwise_asks_both_orders(evaluated, servers):
    report, _, _ = evaluated
    pairs = {(p["model_1"], p["model_2"]): p for p in report["summary"]["pairwise"]}
    assert set(pairs) == {("good", "bad"), ("good", "mute"), ("bad", "mute")}
    assert (pairs["good", "bad"]["win"], pairs["good", "bad"]["win_rate"]) == (6, 1.0)
    assert (pairs["bad", "mute"]["tie"], pairs["bad", "mute"]["unscored"]) == (6, 0)
    asked = [
        (between(u, "Reply A:", "Reply B:"), between(u, "Reply B:", "Answer with"))
        for b in servers["judge"].requests
        if "Two supporters replied" in (u := b["messages"][1]["content"])
    ]
    assert len(asked) == 3 * 6 * 2
    assert asked.count((GOOD, BAD)) == asked.count((BAD, GOOD)) == 6
    # every verdict keeps the judge's reason in report.json (it used to be dropped)
    for pair in report["pairwise"]:
        for c in pair["comparisons"]:
            assert c["first"]["reasons"] == c["swapped"]["reasons"] == {"verdict": "warmer"}


def test_interactive_dialogues_cover_the_attitudes(evaluated):
    report, _, _ = evaluated
    assert [s["attitude"] for s in report["scenarios"]] == ["open", "neutral", "resistant"]
    for model, records in report["dialogues"].items():
        assert len(records) == 3
        for r in records:
            assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user"]
            assert r["ended_by_seeker"] and r["error"] is None
        summary = report["summary"]["interactive"][model]
        assert summary["judge"]["scores"]["total"]["mean"] == 7.0
        assert set(summary["by_attitude"]) == {"open", "neutral", "resistant"}


def test_report_md_numbers_come_from_report_json(evaluated):
    report, out, _ = evaluated
    md = (out / "report.md").read_text()
    check_md_matches_json(report, md)
    judge_md = md.split("### Judge scores", 1)[1].split("##", 1)[0]
    assert "| good | 6 | 0 | 7.00 [7.00, 7.00] | 2.00 [2.00, 2.00] |" in judge_md
    assert "| mute | 0 | 6 | n/a | n/a | n/a | n/a | n/a | unparsed: 6 |" in judge_md
    assert "| good vs bad | 6 | 0 | 1.00 (6) | 0.00 (0) | 0.00 (0) |" in md
    shown = re.findall(r"^### (\S+#\d+)$", md, re.M)
    assert shown == [c["id"] for c in report["contexts"][:3]]
    first = report["scenarios"][0]["id"]
    assert f"### good with {first} (open, en), judge total 7" in md
    assert "> **Seeker:** Thanks." in md and f"> **good:** {GOOD}" in md


def test_charts_are_valid_pngs(evaluated):
    _, out, _ = evaluated
    check_pngs(
        out,
        [
            "interactive_scores.png",
            "judge_scores.png",
            "pairwise.png",
            "reference_metrics.png",
            "reply_lengths.png",
        ],
    )


def test_fail_if_worse_exits_1_on_worse_and_0_on_equal(ray_local, servers, tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "e").mkdir()
    worse = write_config(tmp_path / "w", servers, {"new": "bad", "old": "good"})
    result = run_cli("eval", "--config", str(worse), "--fail-if-worse", "old")
    assert result.exit_code == 1, result.output
    gate = json.loads((tmp_path / "w" / "report" / "report.json").read_text())["gate"]
    assert gate["difference"] == {"n": 6, "mean": -7.0, "ci": [-7.0, -7.0]} and gate["worse"]
    assert "WORSE" in (tmp_path / "w" / "report" / "report.md").read_text()
    equal = write_config(tmp_path / "e", servers, {"new": "good", "old": "good"})
    servers["good"].peak_in_flight = 0
    result = run_cli("eval", "--config", str(equal), "--fail-if-worse", "old")
    assert result.exit_code == 0, result.output
    # two model names on one server share its bound of 2 (not 2 each)
    assert servers["good"].peak_in_flight == 2
    gate = json.loads((tmp_path / "e" / "report" / "report.json").read_text())["gate"]
    assert gate["difference"] == {"n": 6, "mean": 0.0, "ci": [0.0, 0.0]} and not gate["worse"]
    # a gate that cannot run is a config to fix (exit 2, before Ray), never "worse" (exit 1)
    result = run_cli("eval", "--config", str(equal), "--fail-if-worse", "nobody")
    assert result.exit_code == 2 and "must name one of eval.models" in result.output
    typo = run_cli("eval", "--config", str(equal), "--fail-if-worse", "old", "eval.gate.metric=x")
    assert typo.exit_code == 2 and "eval.gate.metric" in typo.output


def test_a_failing_model_is_counted_not_dropped(ray_local, servers, tmp_path):
    with ScriptedOpenAI(lambda body: Reply("overloaded", status=503), model="down") as down:
        config = write_config(tmp_path, servers | {"down": down}, {"good": "good", "down": "down"})
        cfg = yaml.safe_load(config.read_text())
        del cfg["eval"]["judge"]  # reference metrics only
        config.write_text(yaml.safe_dump(cfg))
        (tmp_path / "report").mkdir(exist_ok=True)  # a reused output_dir: an older run's charts
        for stale in ("pairwise.png", "judge_scores.png"):
            (tmp_path / "report" / stale).write_bytes(b"old")
        result = run_cli("eval", "--config", str(config))
        assert result.exit_code == 0, result.output
        assert len(down.requests) == 6  # max_retries 0: one attempt per context
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    down_summary = report["summary"]["turn"]["down"]
    assert (down_summary["replies"], down_summary["failed"]) == (6, 6)
    assert down_summary["failure_reasons"] == {"http_503": 6}
    assert down_summary["metrics"]["bleu_4"] == {"n": 0, "mean": None, "ci": [None, None]}
    assert report["summary"]["turn"]["good"]["judge"] is None and report["pairwise"] == []
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| down | 6 | 6 | n/a |" in md and "### Judge scores" not in md
    assert "- judge: none" in md and "- rubric:" not in md
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["reference_metrics.png", "reply_lengths.png"]  # the stale ones removed
    assert "Failed replies (after the endpoint's retries): down: http_503 6" in md
    check_md_matches_json(report, md)


def test_a_run_in_which_every_reply_failed_exits_1_naming_why(ray_local, servers, tmp_path):
    """Every endpoint down (a wrong base_url) used to exit 0 with an empty report, the console
    saying only "6 failed"; like synth, it exits 1 with the most common reason."""
    with ScriptedOpenAI(lambda body: Reply("overloaded", status=503), model="down") as down:
        config = write_config(tmp_path, servers | {"down": down}, {"down": "down"})
        cfg = yaml.safe_load(config.read_text())
        del cfg["eval"]["judge"]
        config.write_text(yaml.safe_dump(cfg))
        result = run_cli("eval", "--config", str(config))
    assert result.exit_code == 1, result.output
    assert (
        "error: nothing was evaluated: all 6 replies and dialogues failed, most often with "
        "'http_503: " in result.output
    )
    assert "check the endpoints of eval.models (and the Seeker's): base_url" in result.output
    assert (tmp_path / "report" / "report.json").exists()  # written first, as synth's


def test_a_judge_that_scored_nothing_exits_1_naming_why(ray_local, servers, tmp_path):
    """A configured judge whose endpoint was down left every judge column empty, and eval
    exited 0 as if the report measured something (a judge that answers prose is a weak judge,
    shown in the report, not a failed run: the tiny-model eval test uses one)."""
    with ScriptedOpenAI(lambda body: Reply("overloaded", status=503), model="judge") as down:
        config = write_config(tmp_path, servers | {"judge": down}, {"good": "good"})
        result = run_cli("eval", "--config", str(config))
    assert result.exit_code == 1, result.output
    assert (
        "error: the judge scored none of the 6 replies and dialogues it was given, most often "
        "for 'endpoint: http_503' (6); check eval.judge.endpoint" in result.output
    )
    # a judge that answers what cannot be read is the report's to show, not a failed run
    with ScriptedOpenAI(lambda body: Reply("no idea"), model="judge") as prose:
        config = write_config(tmp_path, servers | {"judge": prose}, {"good": "good"})
        result = run_cli("eval", "--config", str(config))
    assert result.exit_code == 0, result.output
    unread = json.loads((tmp_path / "report" / "report.json").read_text())
    assert unread["summary"]["turn"]["good"]["judge"]["unscored_reasons"] == {"unparsed": 6}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["summary"]["turn"]["good"]["judge"]["unscored"] == 6
    # one score is enough: the judge works, an item it could not score is in the report
    state = {"n": 0}

    def once(body: dict) -> Reply:
        state["n"] += 1
        return Reply(judge(body)) if state["n"] == 1 else Reply("overloaded", status=503)

    with ScriptedOpenAI(once, model="judge") as flaky:
        config = write_config(tmp_path, servers | {"judge": flaky}, {"good": "good"})
        result = run_cli("eval", "--config", str(config))
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "report" / "report.json").read_text())
    assert scored["summary"]["turn"]["good"]["judge"]["scored"] == 1


def test_an_api_key_exported_after_the_cluster_started_reaches_the_tasks(
    ray_local, servers, tmp_path, monkeypatch
):
    """Keys are read on the driver and handed to the phase tasks as arguments (a running
    cluster's workers never see a variable exported later; runtime_env would show them in
    Ray's dashboard)."""
    monkeypatch.setenv("SOULRAY_TEST_EVAL_KEY", "sk-eval-1")  # Ray is already up
    config = write_config(tmp_path, servers, {"good": "good"})
    cfg = yaml.safe_load(config.read_text())
    cfg["eval"]["models"][0]["endpoint"]["api_key_env"] = "SOULRAY_TEST_EVAL_KEY"
    del cfg["eval"]["judge"]
    config.write_text(yaml.safe_dump(cfg))
    before = len(servers["good"].auth)
    result = run_cli("eval", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert set(servers["good"].auth[before:]) == {"Bearer sk-eval-1"}
    assert len(servers["good"].auth) - before == 6  # one request per context


def test_the_judge_plays_the_seeker_at_the_seeker_temperature(evaluated, servers):
    """The judge's endpoint (temperature 0.0 in the config) plays the Seeker at
    interactive.seeker_temperature (0.7 by default): the role-play varies, the verdicts don't.
    Read from the requests the judge server got, as interactive_task sends them."""
    temps: dict[bool, set] = {True: set(), False: set()}
    for body in servers["judge"].requests:
        temps["role-playing a person" in body["messages"][0]["content"]].add(body["temperature"])
    assert temps[True] == {0.7}
    assert temps[False] and 0.7 not in temps[False]


def judge_kinds(requests: list[dict]) -> dict[str, int]:
    """The judge server's requests by kind (it also plays the Seeker)."""
    kinds = {"seeker": 0, "turn": 0, "pair": 0, "dialogue": 0}
    for body in requests:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if "role-playing a person" in system:
            kinds["seeker"] += 1
        elif "Two supporters replied" in user:
            kinds["pair"] += 1
        elif user.startswith("Below is a whole conversation"):
            kinds["dialogue"] += 1
        else:
            kinds["turn"] += 1
    return kinds


def test_a_run_that_dies_late_resumes_from_its_saved_phases(
    ray_local, servers, tmp_path, monkeypatch, caplog
):
    """Replies and verdicts are saved as each phase finishes; after a failure in the dialogues,
    --resume asks nothing again that was answered with the same settings, and a changed setting
    redoes exactly the phases it affects. Without --resume nothing is reused."""
    import soulray.eval.run as run

    interactive = {"enabled": True, "scenarios": 2, "turns": 2, "languages": ["en"]}
    config = write_config(
        tmp_path, servers, {"good": "good", "bad": "bad"}, interactive=interactive
    )

    def driver_dies(*args):
        raise RuntimeError("the driver's node went away")

    monkeypatch.setattr(run, "run_interactive", driver_dies)
    with pytest.raises(RuntimeError, match="node went away"):
        run_cli("eval", "--config", str(config))
    assert "run the same command with --resume" in caplog.text
    phases = tmp_path / "report" / "phases"
    assert sorted(p.name for p in phases.iterdir()) == ["judge.json", "replies.json"]
    assert not (tmp_path / "report" / "report.json").exists()
    monkeypatch.undo()

    def sent() -> tuple[int, int, dict[str, int]]:
        return (
            len(servers["good"].requests),
            len(servers["bad"].requests),
            judge_kinds(servers["judge"].requests),
        )

    good, bad, judged = sent()
    result = run_cli("eval", "--config", str(config), "--resume")
    assert result.exit_code == 0, result.output
    good2, bad2, judged2 = sent()
    # the turn replies, judge scores and pairwise verdicts came from the saved phases; only the
    # dialogues were run: 2 scenarios x 2 models, the Seeker's turns and a verdict for each
    assert (good2 - good, bad2 - bad) == (2, 2)  # one reply per scenario (the Seeker then ends)
    assert judged2["turn"] == judged["turn"] and judged2["pair"] == judged["pair"]
    assert judged2["dialogue"] - judged["dialogue"] == 4
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["meta"]["reused"] == ["replies of good", "replies of bad", "judge"]
    resumed = report
    assert report["summary"]["turn"]["good"]["judge"]["scores"]["total"]["mean"] == 7.0
    assert report["summary"]["turn"]["bad"]["judge"]["scores"]["total"]["mean"] == 0.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "- reused from an earlier run (--resume): replies of good, replies of bad, judge" in md
    check_md_matches_json(report, md)

    # changed settings of one model and of the judge: that model's replies, the judge and the
    # dialogues run again; the other model's replies are still reused
    cfg = yaml.safe_load(config.read_text())
    cfg["eval"]["models"][1]["endpoint"]["max_tokens"] = 99
    cfg["eval"]["judge"]["endpoint"]["temperature"] = 0.1
    config.write_text(yaml.safe_dump(cfg))
    result = run_cli("eval", "--config", str(config), "--resume")
    assert result.exit_code == 0, result.output
    good3, bad3, judged3 = sent()
    assert (good3 - good2, bad3 - bad2) == (2, 6 + 2)  # the dialogues are one phase for all
    assert judged3["turn"] - judged2["turn"] == 6 + 6 + 6  # bad's cut-off answers retried once
    assert judged3["pair"] - judged2["pair"] == 2 * 6
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["meta"]["reused"] == ["replies of good"]

    # without --resume, everything is asked again
    result = run_cli("eval", "--config", str(config))
    assert result.exit_code == 0, result.output
    good4, bad4, _ = sent()
    assert (good4 - good3, bad4 - bad3) == (6 + 2, 6 + 2)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["meta"]["reused"] == []
    # what the resumed run reported is what a run from scratch reports
    for part in ("contexts", "replies", "pairwise", "dialogues"):
        assert resumed[part] == report[part], part
    assert resumed["summary"] == report["summary"]


def test_a_resumed_run_asks_again_only_what_failed(ray_local, servers, tmp_path, caplog):
    """A server that was down gave failed replies; they are saved, but --resume asks for them
    again (a failure is no answer to keep), and reuses the other model's answers."""
    down = {"now": True}

    def flaky(body):
        return Reply("overloaded", status=503) if down["now"] else Reply(GOOD)

    with ScriptedOpenAI(flaky, model="flaky") as server:
        config = write_config(
            tmp_path, servers | {"flaky": server}, {"good": "good", "flaky": "flaky"}
        )
        assert run_cli("eval", "--config", str(config)).exit_code == 0
        before = json.loads((tmp_path / "report" / "report.json").read_text())
        assert before["summary"]["turn"]["flaky"]["failed"] == 6
        down["now"], asked, good = False, len(server.requests), len(servers["good"].requests)
        caplog.clear()
        with caplog.at_level("INFO", logger="soulray.eval"):
            result = run_cli("eval", "--config", str(config), "--resume")
        assert result.exit_code == 0, result.output
        said = [m for m in caplog.messages if m.startswith("eval --resume: reused")]
        assert said == [
            "eval --resume: reused 6 of the 6 saved replies of good",
            "eval --resume: reused 0 of the 6 saved replies of flaky; asking again for the 6 "
            "that failed",
        ]
        # the judge scored the failed replies: out of date because of them, not other settings
        assert "eval --resume: the saved judge is out of date (replies of flaky were asked " in (
            caplog.text
        )
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        assert (len(server.requests) - asked, len(servers["good"].requests) - good) == (6, 0)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["text"] for r in report["replies"]["flaky"]] == [GOOD] * 6
    assert report["summary"]["turn"]["flaky"]["failed"] == 0
    assert report["replies"]["good"] == before["replies"]["good"]


def test_a_resumed_run_judges_again_a_dialogue_only_its_judge_failed(
    ray_local, servers, tmp_path, caplog
):
    """A dialogue whose judge's endpoint failed was played again from its first turn on
    --resume (new Seeker and model calls, another dialogue): it is judged again as it was."""
    down = {"now": True}

    def dialogue_judge_down(body: dict) -> Reply:
        whole = body["messages"][1]["content"].startswith("Below is a whole conversation")
        return Reply("overloaded", status=503) if whole and down["now"] else Reply(judge(body))

    interactive = {"enabled": True, "scenarios": 2, "turns": 2, "languages": ["en"]}
    with ScriptedOpenAI(dialogue_judge_down, model="judge") as judge_server:
        config = write_config(
            tmp_path, servers | {"judge": judge_server}, {"good": "good"}, interactive=interactive
        )
        assert run_cli("eval", "--config", str(config)).exit_code == 0
        before = json.loads((tmp_path / "report" / "report.json").read_text())
        assert before["summary"]["interactive"]["good"]["judge"]["unscored_reasons"] == {
            "endpoint: http_503": 2
        }
        down["now"], asked = False, len(servers["good"].requests)
        kinds = judge_kinds(judge_server.requests)
        caplog.clear()
        with caplog.at_level("INFO", logger="soulray.eval"):
            result = run_cli("eval", "--config", str(config), "--resume")
        assert result.exit_code == 0, result.output
        assert (
            "eval --resume: kept 2 saved dialogues; judging again the 2 whose judge's endpoint "
            "failed (good: 2)" in caplog.messages
        )
        again = judge_kinds(judge_server.requests)
        assert {k: again[k] - kinds[k] for k in kinds} == {
            "seeker": 0,
            "turn": 0,
            "pair": 0,
            "dialogue": 2,
        }
        assert len(servers["good"].requests) == asked  # nothing played again
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["summary"]["interactive"]["good"]["judge"]["scored"] == 2
    played = [d["messages"] for d in report["dialogues"]["good"]]
    assert played == [d["messages"] for d in before["dialogues"]["good"]]


def test_send_strategies_sends_each_earlier_replys_strategy_only_where_set(ray_local, tmp_path):
    """A strategy-tagged model was trained on "[Strategy] text" history: with send_strategies
    its endpoint gets each earlier reply's strategy (the reference's in a context, the one its
    server reported in a dialogue); without it, plain OpenAI messages."""
    from scripted_openai import completion_body

    from soulray.eval.config import ContextsConfig
    from soulray.eval.contexts import sample_contexts

    def tagged_reply(body: dict) -> Reply:
        answer = completion_body("m", GOOD, 1, 1) | {"strategy": "Question"}  # as soulray serve
        return Reply(raw=json.dumps(answer).encode())

    said = "I still cannot sleep."
    with (
        ScriptedOpenAI(tagged_reply, model="tagged") as tagged,
        ScriptedOpenAI(tagged_reply, model="plain") as plain,
        ScriptedOpenAI(lambda body: said, model="seeker") as seeker,
    ):
        cfg = {
            "eval": {
                "models": [
                    {"name": "tagged", "endpoint": endpoint(tagged, send_strategies=True)},
                    {"name": "plain", "endpoint": endpoint(plain)},
                ],
                "contexts": {"source": "files", "inputs": CORPUS, "n": 6, "seed": 3},
                "interactive": {
                    "enabled": True,
                    "seeker": endpoint(seeker),
                    "scenarios": 1,
                    "turns": 2,
                    "languages": ["en"],
                },
                "output_dir": str(tmp_path / "report"),
            }
        }
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
        result = run_cli("eval", "--config", str(tmp_path / "eval.yaml"))
        assert result.exit_code == 0, result.output
    contexts = sample_contexts(ContextsConfig(source="files", inputs=CORPUS, n=6, seed=3))
    histories = [c.messages for c in contexts]
    strategies = [m["strategy"] for h in histories for m in h if "strategy" in m]
    assert len(strategies) == 8 and "Reflection of feelings" in strategies
    reply = {"role": "assistant", "content": GOOD}
    dialogue = [[{"role": "user", "content": said}], [{"role": "user", "content": said}, reply]]
    dialogue[1][1:] = [reply | {"strategy": "Question"}, {"role": "user", "content": said}]
    plain_dialogue = [dialogue[0], [dialogue[1][0], reply, dialogue[1][2]]]
    plain_histories = [[{"role": m["role"], "content": m["content"]} for m in h] for h in histories]

    def sent(server: ScriptedOpenAI) -> list[str]:
        return sorted(json.dumps(r["messages"]) for r in server.requests)

    assert sent(tagged) == sorted(json.dumps(h) for h in histories + dialogue)
    assert sent(plain) == sorted(json.dumps(h) for h in plain_histories + plain_dialogue)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for model in ("tagged", "plain"):  # the strategy each reply used is kept either way
        (record,) = report["dialogues"][model]
        assert record["messages"] == [*dialogue[1], reply | {"strategy": "Question"}]
