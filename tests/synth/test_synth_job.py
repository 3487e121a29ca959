"""The synth job on local Ray against a scripted OpenAI-compatible server over real HTTP:
strategies on the right turns, `prepare` on the output with exact counts, resume, and
backends that refuse connections or time out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scripted_openai import Reply, ScriptedOpenAI
from soulray_testing import QUICKSTART, free_port
from synth_script import ScriptedRoles, role_of

from soulray.config import load_config
from soulray.synth.job import run_synth
from soulray.synth.output import OutputStore


def synth_config(out: Path, url: str, count: int, *extra: str):
    return load_config(
        None,
        [
            f"synth.output_dir={out}",
            f"synth.roles.seeker.base_url={url}",
            "synth.roles.seeker.model=scripted",
            f"synth.scenarios.count={count}",
            "synth.loop.min_turns=2",
            "synth.loop.max_turns=4",
            "synth.job.actors=1",
            "synth.job.dialogues_per_actor=4",
            "synth.job.num_cpus_per_actor=0.25",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def happy(ray_local, tmp_path_factory):
    """Six dialogues made by the scripted roles (each: 3 Seeker turns, 2 replies)."""
    out = tmp_path_factory.mktemp("synth") / "out"
    roles = ScriptedRoles(stop_after=3)
    with ScriptedOpenAI(roles) as server:
        report = run_synth(synth_config(out, server.url, 6))
    return out, report, roles, server


def test_strategies_land_on_the_supporter_turns(happy) -> None:
    out, report, roles, server = happy
    records = [json.loads(line) for line in (out / "part-00000.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert sorted(r["metadata"]["scenario"]["language"] for r in records) == ["en"] * 3 + ["zh"] * 3
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 2 + ["user"]
        assert [m.get("strategy") for m in r["messages"]] == [
            None,
            "Question",
            None,
            "Reflection of feelings",
            None,
        ]
        assert [m.get("rationale") for m in r["messages"][1::2]] == ["turn 1", "turn 2"]
        assert r["metadata"]["stop_reason"] == "seeker_ended"
        assert r["metadata"]["models"] == {
            "seeker": "scripted",
            "counselor": "scripted",
            "supporter": "scripted",
        }
    assert roles.calls == {"seeker": 18, "counselor": 12, "supporter": 12}


def test_report_counts_and_charts(happy) -> None:
    out, report, _, _ = happy
    assert report["dialogues"] == {"written": 6, "dropped": {}, "failed": {}, "failed_example": {}}
    assert report["utterances"] == 30
    assert report["turns_per_dialogue"] == {
        "count": 6,
        "mean": 2.0,
        "median": 2.0,
        "min": 2,
        "max": 2,
        "histogram": {"2": 6},
    }
    overall = report["strategies"]["overall"]
    assert (overall["Question"], overall["Reflection of feelings"], sum(overall.values())) == (
        6,
        6,
        12,
    )
    assert report["strategies"]["by_stage"]["exploration"]["Question"] == 6
    assert report["strategies"]["by_stage"]["comforting"]["Reflection of feelings"] == 6
    assert report["strategies"]["by_phase"]["early"]["Question"] == 6
    assert report["strategies"]["by_phase"]["middle"]["Reflection of feelings"] == 6  # 2 of 2
    assert report["run"]["written"] == 6 and report["run"]["completion_tokens"] > 0
    saved = json.loads((out / "_synth" / "synth_report.json").read_text())
    assert saved["dialogues"] == report["dialogues"]
    for name in ("strategies.png", "strategies_by_phase.png", "turns.png", "reply_lengths.png"):
        assert (out / "_synth" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepare_reads_the_output_unchanged(happy, tmp_path) -> None:
    from soulray.data.pipeline import run_prepare

    out, _, _, _ = happy
    cfg = load_config(
        QUICKSTART,
        [f"data.inputs=[{out}]", f"data.output_dir={tmp_path / 'prepared'}", "data.val_fraction=0"],
    )
    manifest = run_prepare(cfg)
    assert (manifest["records"], manifest["conversations"], manifest["rejected"]) == (6, 6, {})
    assert (manifest["turns"], manifest["assistant_turns"]) == (30, 12)
    assert manifest["unknown_strategies"] == {}
    assert manifest["files"] == 1  # the shard; _synth/ is skipped


def test_rerun_skips_what_is_written_and_makes_only_the_new(happy, tmp_path) -> None:
    out, _, _, _ = happy
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    roles = ScriptedRoles(stop_after=3)
    with ScriptedOpenAI(roles) as server:
        report = run_synth(synth_config(copy, server.url, 8))
    assert roles.calls["seeker"] == 2 * 3  # two new scenarios only
    assert report["run"]["written"] == 2 and report["dialogues"]["written"] == 8
    assert sorted(p.name for p in copy.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl"]
    first = OutputStore(str(copy)).load().records[:6]
    assert first == OutputStore(str(out)).load().records


def test_ctrl_c_still_writes_the_report_and_the_same_command_finishes(
    happy, tmp_path, monkeypatch, caplog
) -> None:
    """Ctrl-C arrives after a new dialogue is written: the report then counts what is in the
    output (not an older run's report), and the re-run makes only the scenarios left."""
    out, _, _, _ = happy
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    real_write = OutputStore.write_dialogue

    def write_then_interrupt(self, record):
        real_write(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputStore, "write_dialogue", write_then_interrupt)
    roles = ScriptedRoles(stop_after=3)
    with ScriptedOpenAI(roles) as server, pytest.raises(KeyboardInterrupt):
        run_synth(synth_config(copy, server.url, 9))
    report = json.loads((copy / "_synth" / "synth_report.json").read_text())
    assert report["dialogues"]["written"] == 7 and report["run"]["scenarios"] == 3
    assert "interrupted;" in caplog.text and "covers the 7 dialogues written" in caplog.text
    monkeypatch.undo()
    roles = ScriptedRoles(stop_after=3)
    with ScriptedOpenAI(roles) as server:
        report = run_synth(synth_config(copy, server.url, 9))
    assert report["run"]["written"] == 2 and report["dialogues"]["written"] == 9


def test_failing_backends_fail_their_scenarios_and_the_run_that_made_none(happy, tmp_path) -> None:
    """Each failure is recorded with its reason; a run in which every scenario failed (a wrong
    or down endpoint) is an error, after its report is written (a partial failure is not: see
    the timeout test)."""
    out, _, _, _ = happy
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    refused = f"http://127.0.0.1:{free_port()}/v1"
    roles = ScriptedRoles(stop_after=3)
    with ScriptedOpenAI(roles) as server:
        cfg = synth_config(
            copy,
            server.url,
            10,
            f"synth.roles.supporter.base_url={refused}",
            "synth.roles.supporter.max_retries=1",
        )
        with pytest.raises(ValueError) as error:
            run_synth(cfg)
    reason = f"connection: cannot reach {refused}"
    assert str(error.value) == (
        f"synth: all 4 scenarios failed, most often with {reason!r}; check synth.roles "
        "(base_url ends in /v1, the server is up, the model name is served); details in "
        f"{copy}/_synth/synth_report.json and failed.jsonl"
    )
    report = json.loads((copy / "_synth" / "synth_report.json").read_text())
    assert report["dialogues"] == {
        "written": 6,
        "dropped": {},
        "failed": {"connection": 4},
        "failed_example": {"connection": reason},
    }
    assert report["run"] | {"elapsed_s": 0} == report["run"] | {
        "written": 0,
        "dropped": 0,
        "failed": 4,
        "elapsed_s": 0,
    }
    assert OutputStore(str(copy)).load().records == OutputStore(str(out)).load().records
    failed = [json.loads(x) for x in (copy / "_synth" / "failed.jsonl").read_text().splitlines()]
    assert {f["reason"] for f in failed} == {reason}


def test_a_run_that_made_none_names_its_own_failures_not_an_earlier_runs(
    ray_local, tmp_path
) -> None:
    """failed.jsonl still holds an earlier run's failures (an old base_url): the error names
    this run's reason and counts the earlier ones apart."""
    out = tmp_path / "out"
    (out / "_synth").mkdir(parents=True)
    old = [{"id": f"old-{k}", "reason": "connection: cannot reach http://old/v1"} for k in range(3)]
    (out / "_synth" / "failed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    refused = f"http://127.0.0.1:{free_port()}/v1"
    cfg = synth_config(out, refused, 2, "synth.roles.seeker.max_retries=0")
    with pytest.raises(ValueError) as error:
        run_synth(cfg)
    assert str(error.value) == (
        f"synth: all 2 scenarios failed, most often with 'connection: cannot reach {refused}'; "
        "check synth.roles (base_url ends in /v1, the server is up, the model name is served); "
        f"details in {out}/_synth/synth_report.json and failed.jsonl (and 3 from earlier runs)"
    )


def test_an_api_key_exported_after_the_cluster_started_reaches_the_actors(
    ray_local, tmp_path, monkeypatch
) -> None:
    """The key is read on the driver and sent to the actors with the job (runtime_env): a
    running cluster's workers never see a variable exported in the shell that submits."""
    monkeypatch.setenv("SOULRAY_TEST_SYNTH_KEY", "sk-late-1")  # Ray is already up
    roles = ScriptedRoles(stop_after=3)
    with ScriptedOpenAI(roles) as server:
        cfg = synth_config(
            tmp_path / "out", server.url, 1, "synth.roles.seeker.api_key_env=SOULRAY_TEST_SYNTH_KEY"
        )
        report = run_synth(cfg)
    assert report["dialogues"] == {"written": 1, "dropped": {}, "failed": {}, "failed_example": {}}
    # three Seeker messages (the third ends it), a Counselor and a Supporter turn after each
    # of the first two: seven requests, every one with the key
    assert roles.calls == {"seeker": 3, "counselor": 2, "supporter": 2}
    assert server.auth == ["Bearer sk-late-1"] * 7
    assert "sk-late-1" not in (tmp_path / "out" / "_synth" / "config.yaml").read_text()


def test_a_timeout_fails_only_the_scenarios_it_hits(ray_local, tmp_path) -> None:
    roles = ScriptedRoles(stop_after=3)

    def slow_for_chinese(body):
        system = body["messages"][0]["content"]
        if role_of(body) == "supporter" and system.startswith("你"):
            return Reply("太慢了", delay_s=3.0)
        return roles(body)

    with ScriptedOpenAI(slow_for_chinese) as server:
        cfg = synth_config(
            tmp_path / "out",
            server.url,
            4,
            "synth.roles.supporter.timeout_s=0.5",
            "synth.roles.supporter.max_retries=0",
        )
        report = run_synth(cfg)
    reason = f"timeout: {server.url} did not answer in time"
    assert report["dialogues"] == {
        "written": 2,
        "dropped": {},
        "failed": {"timeout": 2},
        "failed_example": {"timeout": reason},
    }
    records = OutputStore(str(tmp_path / "out")).load().records
    assert [r["metadata"]["scenario"]["language"] for r in records] == ["en", "en"]


def test_progress_is_logged_before_the_first_dialogue_ends(ray_local, tmp_path, caplog) -> None:
    """The log said nothing of synth's own until a dialogue ended (minutes on a real model)."""
    roles = ScriptedRoles(stop_after=3)

    def slow(body):
        return Reply(roles(body), delay_s=0.4)

    with ScriptedOpenAI(slow) as server:
        cfg = synth_config(tmp_path / "out", server.url, 2, "synth.job.progress_every_s=0.3")
        with caplog.at_level("INFO", logger="soulray.synth"):
            report = run_synth(cfg)
    assert report["run"]["written"] == 2 and report["run"]["first_result_s"] > 1.0
    said = [m for m in caplog.messages if m.startswith("synth: ")]
    assert said[1] == "synth: 1 actor(s), up to 4 dialogues each at once; progress every 0.3 s"
    assert said[2].startswith("synth: 0/2 scenarios done (0 written, 0 dropped, 0 failed), ")
    assert said[-1].startswith("synth: 2/2 scenarios done (2 written, 0 dropped, 0 failed), ")


class EmptyFirstReply(ScriptedRoles):
    """The Supporter's first reply is empty: every dialogue is dropped before min_turns."""

    def supporter(self, messages: list[dict[str, str]]) -> str:
        return "" if not any(m["role"] == "assistant" for m in messages[1:]) else "ok"


def test_the_report_counts_what_happened_in_dropped_dialogues_too(ray_local, tmp_path) -> None:
    """Counselor retries and broken rules inside a dropped dialogue used to vanish from the
    report (it summed only the written ones): they are in quality_dropped and dropped.jsonl."""
    out = tmp_path / "out"
    roles = EmptyFirstReply(counselor=lambda k, attempt: "not json" if attempt == 0 else None)
    with ScriptedOpenAI(roles) as server:
        report = run_synth(synth_config(out, server.url, 3))
    assert report["dialogues"]["written"] == 0
    assert report["dialogues"]["dropped"] == {"empty_supporter": 3}
    assert report["quality"] == {}
    assert report["quality_dropped"] == {
        "counselor_fallback": 0,
        "counselor_invalid_json": 3,
        "counselor_retried_ok": 3,
        "empty_supporter": 3,
    }
    assert roles.calls == {"seeker": 3, "counselor": 6, "supporter": 3}
    rows = [json.loads(x) for x in (out / "_synth" / "dropped.jsonl").read_text().splitlines()]
    assert [r["counts"] for r in rows] == [
        {
            "counselor_invalid_json": 1,
            "counselor_fallback": 0,
            "counselor_retried_ok": 1,
            "empty_supporter": 1,
        }
    ] * 3
