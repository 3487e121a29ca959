"""End to end over real HTTP: a tiny export served by soulray's Serve app on local Ray plays all
three roles, `soulray synth` writes the dialogues, `soulray prepare` reads them with exact
counts. The tiny model writes nonsense, so the Counselor never answers usable JSON: every reply
carries the fallback strategy, and the counts must say so."""

from __future__ import annotations

import json

import pytest
from soulray_testing import QUICKSTART, free_port
from typer.testing import CliRunner

from soulray.cli import app
from soulray.config import Config

pytestmark = pytest.mark.slow
SCENARIOS = 4


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """One Serve app (ingress + hf engine on a random tiny export) for the module."""
    from ray import serve

    from soulray.serve.app import start_serving
    from soulray.serve.tiny import build_tiny_export

    export = build_tiny_export(tmp_path_factory.mktemp("export"))
    cfg = Config.model_validate(
        {
            "serve": {
                "port": free_port(),
                "ingress": {"num_cpus": 0.1},
                "engine": {"model_dir": str(export), "num_cpus": 0.5},
            }
        }
    )
    url = start_serving(cfg)
    yield f"{url}/v1"
    serve.shutdown()


def test_synth_then_prepare_on_a_served_tiny_model(served, tmp_path) -> None:
    out, prepared = tmp_path / "synth", tmp_path / "prepared"
    runner = CliRunner()
    synth = runner.invoke(
        app,
        [
            "synth",
            "--config",
            str(QUICKSTART),
            f"synth.output_dir={out}",
            f"synth.roles.seeker.base_url={served}",
            "synth.roles.seeker.model=soulray",
            "synth.roles.seeker.temperature=0",
            "synth.roles.seeker.max_tokens=24",
            f"synth.scenarios.count={SCENARIOS}",
            "synth.loop.min_turns=1",
            "synth.loop.max_turns=2",
            "synth.loop.counselor_retries=1",
            "synth.quality.check_language=false",  # the tiny model speaks no language
            "synth.job.actors=1",
            "synth.job.num_cpus_per_actor=0.25",
        ],
    )
    assert synth.exit_code == 0, synth.output
    report = json.loads((out / "_synth" / "synth_report.json").read_text())
    d = report["dialogues"]
    assert d["failed"] == {}
    assert d["written"] + sum(d["dropped"].values()) == SCENARIOS
    assert d["written"] >= 1, d
    assert f"synth: {d['written']} dialogues written this run" in synth.output

    records = [
        json.loads(x) for p in sorted(out.glob("part-*.jsonl")) for x in p.read_text().splitlines()
    ]
    replies = [m for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert {m["strategy"] for m in replies} == {"Others"}  # the taxonomy's fallback
    # Counselor rounds: one per kept reply, plus one per dialogue ended by a bad reply.
    rounds = len(replies) + sum(
        r["metadata"]["stop_reason"].endswith("_supporter") for r in records
    )
    quality = report["quality"]
    assert quality["counselor_fallback"] == rounds
    answers = quality.get("counselor_invalid_json", 0) + quality.get(
        "counselor_unknown_strategy", 0
    )
    assert answers == 2 * rounds  # one answer and one retry per round, all unusable
    assert {r["metadata"]["models"]["supporter"] for r in records} == {"soulray"}

    prep = runner.invoke(
        app,
        [
            "prepare",
            "--config",
            str(QUICKSTART),
            f"data.inputs=[{out}]",
            f"data.output_dir={prepared}",
            "data.val_fraction=0",
            "data.num_workers=1",
        ],
    )
    assert prep.exit_code == 0, prep.output
    manifest = json.loads((prepared / "manifest.json").read_text())
    turns = sum(len(r["messages"]) for r in records)
    assert (manifest["conversations"], manifest["rejected"]) == (len(records), {})
    assert (manifest["turns"], manifest["assistant_turns"]) == (turns, len(replies))
