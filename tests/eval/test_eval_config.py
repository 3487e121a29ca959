"""The eval section refuses what cannot run, naming the key and the fix, before any request."""

from __future__ import annotations

import re

import pytest
from scripted_openai import ScriptedOpenAI
from soulray_testing import ROOT

from soulray.config import ConfigError, load_config
from soulray.eval.config import EvalConfig
from soulray.eval.run import check_config, interactive_scenarios

SAMPLE = str(ROOT / "jobs" / "data" / "sample_en.jsonl")
EP = "{base_url: 'http://127.0.0.1:1/v1', model: m}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.contexts.source=prepared"], "needs prepared_dir"),
        (["eval.contexts.source=files"], "needs inputs"),
        ([f"eval.models=[{{name: a, endpoint: {EP}}}, {{name: a, endpoint: {EP}}}]"], "unique"),
        ([f"eval.models=[{{name: 'a b', endpoint: {EP}}}]"], "eval.models.0.name"),
        (["eval.judge.rubrik=x"], "Did you mean 'eval.judge.rubric'"),
        ([f"eval.models=[{{name: a, endpoint: {EP}}}]", "eval.gate.candidate=b"], "not one of"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.fixture
def server():
    """An endpoint that records what it is asked: the checks below must ask it nothing."""
    with ScriptedOpenAI(lambda body: "unused") as scripted:
        yield scripted


def assert_never_asked(server: ScriptedOpenAI) -> None:
    assert (server.requests, server.model_lists) == ([], 0)


def models(*names: str, base_url: str = "http://127.0.0.1:1/v1") -> list[dict]:
    return [{"name": n, "endpoint": {"base_url": base_url, "model": n}} for n in names]


def test_run_checks_before_any_request(monkeypatch, server):
    url = server.url
    contexts = {"source": "files", "inputs": [SAMPLE]}
    with pytest.raises(ValueError, match="eval.models is empty"):
        check_config(EvalConfig(contexts=contexts), None)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        check_config(EvalConfig(models=models("a", base_url=url)), None)
    with pytest.raises(ValueError, match="needs a Seeker"):
        check_config(
            EvalConfig(models=models("a", base_url=url), interactive={"enabled": True}), None
        )
    with pytest.raises(ValueError, match="must name one of eval.models"):
        check_config(EvalConfig(models=models("a", "b", base_url=url), contexts=contexts), "c")
    keyed = models("a", base_url=url)
    keyed[0]["endpoint"]["api_key_env"] = "SOULRAY_TEST_ABSENT_KEY"
    monkeypatch.delenv("SOULRAY_TEST_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="SOULRAY_TEST_ABSENT_KEY is not set"):
        check_config(EvalConfig(models=keyed, contexts=contexts), None)
    missing = {"source": "files", "inputs": ["nowhere.jsonl"]}  # found before Ray starts
    with pytest.raises(ValueError, match="^eval.contexts.inputs entry 'nowhere.jsonl' matches no"):
        check_config(EvalConfig(models=models("a", base_url=url), contexts=missing), None)
    not_prepared = {"source": "prepared", "prepared_dir": "/nowhere"}
    with pytest.raises(ValueError, match="is not a `soulray prepare` output"):
        check_config(EvalConfig(models=models("a", base_url=url), contexts=not_prepared), None)
    typo = {"rubric": "soulchta"}  # found before Ray starts, not after it (exit 2)
    with pytest.raises(ValueError, match="eval.judge.rubric 'soulchta' is neither a built-in"):
        check_config(
            EvalConfig(models=models("a", base_url=url), contexts=contexts, judge=typo), None
        )
    assert_never_asked(server)


def test_the_gate_is_checked_before_any_request(server):
    """A gate that cannot be computed is refused up front, not after every reply is in."""
    contexts = {"source": "files", "inputs": [SAMPLE]}
    judge = {"endpoint": {"base_url": server.url, "model": "judge"}}

    def check(gate, **more):
        cfg = {"models": models("new", "old", base_url=server.url), "contexts": contexts}
        cfg["judge"] = judge
        check_config(EvalConfig.model_validate(cfg | {"gate": gate} | more), "old")

    check({"metric": "judge_total"})
    check({"candidate": "new", "metric": "judge.Empathy"})
    check({"metric": "rouge_l"}, judge={})
    check({"metric": "interactive.judge_total"}, interactive={"enabled": True})
    refused = [
        (
            {"metric": "judge_totl"},
            {},
            "'judge_totl' is not a metric of this run (did you mean "
            "'judge_total'?); use one of ['judge_total', 'judge.Content', 'judge.Empathy', "
            "'judge.Helpfulness', 'judge.Safety', 'bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', "
            "'rouge_1', 'rouge_2', 'rouge_l'], or interactive.<judge metric>",
        ),
        (
            {"metric": "interactive.rouge_l"},
            {},
            "'interactive.rouge_l' is not a metric of this run",
        ),
        ({"metric": "length"}, {}, "'length' is not a metric of this run"),  # shorter != worse
        ({"metric": "distinct_1"}, {}, "'distinct_1' is not a metric of this run"),
        (
            {"candidate": "old"},
            {},
            "the candidate and the baseline are both 'old'; set "
            "eval.gate.candidate to the model being promoted (one of ['new'])",
        ),
        ({"metric": "judge.Empathy"}, {"judge": {}}, "'judge.Empathy' needs a judge"),
        ({"metric": "interactive.judge_total"}, {}, "needs eval.interactive.enabled: true"),
    ]
    for gate, more, says in refused:
        with pytest.raises(ValueError, match=re.escape(says)):
            check(gate, **more)
    assert_never_asked(server)


def test_interactive_settings_are_checked_before_any_request(tmp_path, server):
    contexts = {"source": "files", "inputs": [SAMPLE]}
    judge = {"endpoint": {"base_url": server.url, "model": "judge"}}
    cfg = {"models": models("a", base_url=server.url), "contexts": contexts, "judge": judge}
    with pytest.raises(ValueError, match="languages"):
        EvalConfig.model_validate(cfg | {"interactive": {"enabled": True, "languages": []}})
    missing = str(tmp_path / "seeker.yaml")
    on = {"enabled": True, "seeker_prompts": missing}
    with pytest.raises(
        ValueError, match=r"^eval.interactive.seeker_prompts=.*seeker.yaml: no such"
    ):
        check_config(EvalConfig.model_validate(cfg | {"interactive": on}), None)
    assert_never_asked(server)


def test_interactive_scenarios_rotate_the_attitudes():
    cfg = EvalConfig(interactive={"scenarios": 7, "languages": ["zh", "en"], "seed": 5})
    drawn = interactive_scenarios(cfg.interactive)
    assert [s.attitude for s in drawn] == ["open", "neutral", "resistant"] * 2 + ["open"]
    assert [s.language for s in drawn] == ["zh", "en"] * 3 + ["zh"]
    assert len({s.id for s in drawn}) == 7  # the id follows the content, attitude included
    assert [s.id for s in interactive_scenarios(cfg.interactive)] == [s.id for s in drawn]


def test_models_and_the_judge_are_greedy_unless_set():
    """jobs/eval.yaml's promise (a reply differs between models, not runs) holds for a config
    that leaves temperature out; the Seeker keeps the shared default, to vary its role-play."""
    ep = {"base_url": "http://x/v1", "model": "m"}
    cfg = EvalConfig.model_validate(
        {
            "models": [
                {"name": "a", "endpoint": ep},
                {"name": "b", "endpoint": ep | {"temperature": 0.5}},
            ],
            "judge": {"endpoint": ep},
            "interactive": {"seeker": ep},
        }
    )
    assert [m.endpoint.temperature for m in cfg.models] == [0.0, 0.5]
    assert cfg.judge.endpoint is not None and cfg.judge.endpoint.temperature == 0.0
    assert cfg.interactive.seeker is not None and cfg.interactive.seeker.temperature == 0.7
    from soulray.eval.run import seeker_from_judge

    seeker = seeker_from_judge(cfg.judge.endpoint, cfg.interactive.seeker_temperature)
    assert seeker is not None and seeker.temperature == 0.7 and seeker.model == "m"


def test_jobs_eval_yaml_judge_plays_a_varied_seeker_also_rerun_from_its_saved_config(tmp_path):
    """jobs/eval.yaml's judge (greedy) also plays the Seeker (eval.interactive.seeker: null) at
    interactive.seeker_temperature. It used to keep 0.7 only while the judge's temperature was
    unwritten, and the saved config.yaml writes every field: a rerun from it had a greedy one."""
    from soulray.config import config_to_yaml
    from soulray.eval.run import seeker_from_judge

    cfg = load_config(ROOT / "jobs" / "eval.yaml", [])
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    for e in (cfg.eval, load_config(saved, []).eval):
        assert e.judge.endpoint is not None and e.judge.endpoint.temperature == 0.0
        seeker = seeker_from_judge(e.judge.endpoint, e.interactive.seeker_temperature)
        assert seeker is not None and (seeker.temperature, seeker.model) == (
            0.7,
            "Qwen/Qwen2.5-72B-Instruct",
        )
    e = load_config(saved, ["eval.interactive.seeker_temperature=1.0"]).eval
    seeker = seeker_from_judge(e.judge.endpoint, e.interactive.seeker_temperature)
    assert seeker is not None and seeker.temperature == 1.0
