"""Typed config: every shipped YAML loads, overrides parse as YAML, unknown keys are refused by
their dotted name at any depth, and the resolved config round-trips through its YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from soulray.config import Config, ConfigError, config_hash, config_to_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml")) + sorted((ROOT / "jobs").glob("*.yml"))


def test_jobs_folder_has_configs():
    assert ROOT / "jobs" / "quickstart.yaml" in JOB_FILES


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_yaml_loads_and_names_its_command(path):
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(tree, dict) and {"apiVersion", "kind"} <= tree.keys():
        pytest.skip(f"{path.name} is a Kubernetes manifest, not a soulray config")
    cfg = load_config(path)
    assert set(tree) <= set(Config.model_fields)
    header = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert header.startswith("#") and f"--config jobs/{path.name}" in header
    # every value the YAML sets, at any depth, is what was loaded (nothing defaulted away)
    dumped = cfg.model_dump(mode="json")
    leaves = list(yaml_leaves(tree))
    assert leaves  # a config that sets nothing would check nothing
    for where, value in leaves:
        assert dumped_at(dumped, where) == value, ".".join(map(str, where))


def yaml_leaves(node, where: tuple = ()):
    """(path, value) of every leaf of a YAML tree: a scalar, a list of scalars (compared whole),
    an empty mapping. A path steps through mapping keys and the indexes of a list of mappings."""
    if isinstance(node, list) and any(isinstance(v, dict) for v in node):
        for i, value in enumerate(node):
            yield from yaml_leaves(value, (*where, i))
    elif isinstance(node, dict) and node:
        for key, value in node.items():
            yield from yaml_leaves(value, (*where, key))
    else:
        yield where, node


def dumped_at(dumped, where: tuple):
    for key in where:
        dumped = dumped[key]
    return dumped


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_resolved_config_round_trips(path, tmp_path):
    cfg = load_config(path)
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg), encoding="utf-8")
    again = load_config(saved)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_to_yaml(again) == config_to_yaml(cfg)


def test_overrides_parse_lists_numbers_booleans_and_null():
    cfg = load_config(
        ROOT / "jobs" / "quickstart.yaml",
        [
            "data.inputs=[a.jsonl, 'corpus/*.json', s3://bucket/x]",
            "data.seq_len=512",
            "data.val_fraction=0.25",
            "data.strategy_tags=false",
            "train.lr=1e-5",
            "model.name_or_path=null",
            "model.tokenizer=",
            "data.strategies.fallback=Question",
            "train.betas=[0.8, 0.99]",
        ],
    )
    assert cfg.data.inputs == ["a.jsonl", "corpus/*.json", "s3://bucket/x"]
    assert (cfg.data.seq_len, cfg.data.val_fraction, cfg.data.strategy_tags) == (512, 0.25, False)
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert (cfg.model.name_or_path, cfg.model.tokenizer) == (None, None)
    assert cfg.data.strategies.fallback == "Question"
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.data.output_dir == "runs/quickstart/data"  # untouched keys keep the YAML's value


def test_overrides_without_a_file_start_from_the_defaults():
    cfg = load_config(None, ["data.seq_len=64", "serve.engine.batching.max_batch_size=4"])
    assert cfg.data.seq_len == 64
    assert cfg.serve.engine.batching.max_batch_size == 4
    assert cfg.data.val_fraction == Config().data.val_fraction


def test_later_override_wins():
    assert load_config(None, ["data.seq_len=64", "data.seq_len=128"]).data.seq_len == 128


@pytest.mark.parametrize(
    ("override", "name", "suggestion"),
    [
        ("data.seq_lne=5", "data.seq_lne", "data.seq_len"),
        ("dat.seq_len=5", "dat", "data"),
        ("data.strategies.fallbak=Others", "data.strategies.fallbak", "data.strategies.fallback"),
        (
            "serve.engine.batching.max_batch_sze=4",
            "serve.engine.batching.max_batch_sze",
            "serve.engine.batching.max_batch_size",
        ),
        ("train.learning_rate=0.1", "train.learning_rate", None),
        # inside lists and dicts of sections
        (
            "serve.adapters=[{name: a, path: /x, pth: 1}]",
            "serve.adapters.0.pth",
            "serve.adapters.0.path",
        ),
        (
            "serve.safety.resources={en-US: [{name: L, contact: '1', categorys: []}]}",
            "serve.safety.resources.en-US.0.categorys",
            "serve.safety.resources.en-US.0.categories",
        ),
    ],
)
def test_unknown_keys_are_refused_by_dotted_name(override, name, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f"unknown config key '{name}'." in message
    if suggestion:
        assert f"Did you mean '{suggestion}'?" in message
    else:
        assert "Did you mean" not in message
    assert message.startswith("invalid config (defaults + overrides):")


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  seq_len: 64\n  strategies:\n    taxonmy: [A]\nmodle: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"invalid config ({path}):")
    assert "unknown config key 'data.strategies.taxonmy'. Did you mean " in message
    assert "'data.strategies.taxonomy'" in message
    assert "unknown config key 'modle'. Did you mean 'model'?" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.seq_len=abc", "config key 'data.seq_len'"),
        (
            "data.seq_len=8",
            "config key 'data.seq_len': Input should be greater than or equal to 16",
        ),
        ("data.mode=zipped", "config key 'data.mode'"),
        ("data.val_fraction=1.0", "config key 'data.val_fraction'"),
        (
            "train.resources_per_worker={CPU: -1}",
            "config key 'train.resources_per_worker.CPU': Input should be greater than or equal "
            "to 0 \\(got -1\\)",
        ),
        (  # it crashed every worker pinning host memory without a GPU
            "train.cpu_offload=true",
            "config key 'train': Value error, train.cpu_offload=true moves a GPU run's",
        ),
        (  # torch's AdamW refused it in every worker, after Ray Train's retries
            "train.betas=[0.9, 1.5]",
            "config key 'train.betas.1': Input should be less than 1 \\(got 1.5\\)",
        ),
        # shapes attention cannot run: a torch size mismatch in every worker, restarted
        (
            "model.tiny.num_key_value_heads=3",
            "config key 'model.tiny': Value error, num_attention_heads=4 is not a multiple of "
            "num_key_value_heads=3 ",
        ),
        (
            "model.tiny.hidden_size=12",
            "config key 'model.tiny': Value error, hidden_size=12 / num_attention_heads=4 gives "
            "heads of 3 dimensions; rotary embeddings need an even number, 2 or more",
        ),
        (
            "model.tiny.num_attention_heads=0",
            "config key 'model.tiny.num_attention_heads': Input should be greater than or equal "
            "to 1 \\(got 0\\)",
        ),
        # an empty path is the current directory: the export cleared it
        (
            'train.export_dir=""',
            "config key 'train.export_dir': String should have at least 1 character \\(got ''\\)",
        ),
        ('serve.model_name=""', "config key 'serve.model_name': String should have at least 1"),
        ('train.run_name=""', "config key 'train.run_name': String should have at least 1"),
        ("pipeline.stages=[]", "config key 'pipeline.stages': List should have at least 1 item"),
    ],
)
def test_bad_values_are_refused_by_name(override, expected):
    with pytest.raises(ConfigError, match=expected) as refused:
        load_config(None, [override])
    assert "'run_name'" not in str(refused.value)  # a section's check does not dump the section


def test_a_list_item_is_overridden_by_its_index_and_a_bare_list_value_shows_the_brackets():
    cfg = load_config(
        ROOT / "jobs" / "eval.yaml",
        ["eval.models.1.endpoint.base_url=http://h:9/v1", "eval.models.-1.endpoint.model=m2"],
    )
    endpoints = [(m.name, m.endpoint.base_url, m.endpoint.model) for m in cfg.eval.models]
    assert endpoints == [
        ("tuned", "http://127.0.0.1:8000/v1", "soulray"),
        ("base", "http://h:9/v1", "m2"),
    ]
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "jobs" / "eval.yaml", ["eval.models.2.name=x"])
    assert str(e.value) == (
        "override 'eval.models.2.name=x': '2' is not an item of that list of 2 (give an index, "
        "0 to 1, or replace the whole list)"
    )
    with pytest.raises(ConfigError, match="no list to take item 0 of .the config file does not"):
        load_config(None, ["data.inputs.0=/x/a.json"])  # the defaults are in the schema
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.inputs=/x/a.json"])
    assert str(e.value).splitlines()[1] == (
        "  config key 'data.inputs' is a list: write it in brackets, data.inputs=[/x/a.json] "
        "(or [a, b] for more) (got '/x/a.json')"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.seq_len", "is not of the form key.path=value"),
        ("=5", "is not of the form key.path=value"),
        ("data.seq_len.x=1", "'seq_len' holds a value, not a section"),
        # YAML reads a leading * as an alias, and a list must close
        ("data.inputs=*.jsonl", r"'data.inputs=\*.jsonl': the value is not valid YAML \("),
        ("data.inputs=[a", "'data.inputs=\\[a': the value is not valid YAML"),
    ],
)
def test_malformed_overrides(override, expected, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  seq_len: 64\n")
    with pytest.raises(ConfigError, match=expected):
        load_config(path, [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("serve.safety.thresholds={suicde: 0.5}", "serve.safety.thresholds"),
        ("serve.safety.lexicon={suicde: [going to the bridge tonight]}", "serve.safety.lexicon"),
        ("serve.safety.intent={suicde: [end it all]}", "serve.safety.intent"),
        ("serve.safety.patterns={suicde: [bridge]}", "serve.safety.patterns"),
        (
            "serve.safety.resources={en-US: [{name: Line, contact: '1', categories: [suicde]}]}",
            "serve.safety.resources.en-US.0.categories",
        ),
    ],
)
def test_a_misspelt_crisis_category_is_refused_by_name(override, key):
    """Accepted, it would silently drop its phrases or help lines (issue 11's screen)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert (
        f"config key '{key}': Value error, unknown categories 'suicde' (did you mean "
        "'suicide'?); use ['suicide', 'self_harm', 'violence', 'abuse']"
    ) in str(info.value)
    good = load_config(None, [override.replace("suicde", "suicide")]).serve.safety
    field = key.split(".")[2]
    value = getattr(good, field)
    if field == "resources":
        assert value["en-US"][0].categories == ["suicide"]
    else:
        assert list(value) == ["suicide"] and value["suicide"]  # kept whole, as written


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    tabbed = tmp_path / "tabbed.yaml"  # one line that says where and why, not yaml's five
    tabbed.write_text("data:\n\tseq_len: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(tabbed)
    assert str(e.value) == (
        f"config {tabbed} is not valid YAML at line 2, column 1: found character '\\t' that "
        "cannot start any token; indent with spaces, not tabs"
    )
    twice = tmp_path / "twice.yaml"  # YAML keeps the last: the first section's keys were lost
    twice.write_text("serve:\n  port: 8001\ntrain:\n  steps: 5\nserve:\n  model_name: m\n")
    with pytest.raises(ConfigError) as e:
        load_config(twice)
    assert str(e.value) == (
        f"config {twice} is not valid YAML at line 5, column 1: the key 'serve' appears twice in "
        "one section (the second would silently replace the first): merge them"
    )
    merged = tmp_path / "merged.yaml"  # a merge key's values may be overridden
    merged.write_text("serve:\n  <<: {port: 8001, model_name: m}\n  port: 8002\n")
    assert (load_config(merged).serve.port, load_config(merged).serve.model_name) == (8002, "m")
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_config(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(empty) == Config()
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match=f"--config {tmp_path} is not a file; name a YAML"):
        load_config(tmp_path)
    gbk = tmp_path / "gbk.yaml"
    gbk.write_bytes("data:\n  seq_len: 512  # 中文注释\n".encode("gbk"))
    with pytest.raises(ConfigError, match="gbk.yaml is not UTF-8 text; save it as UTF-8"):
        load_config(gbk)


def test_an_anchored_mapping_overriding_what_it_merges_may_be_merged_again(tmp_path):
    """Constructing a merge rewrote the anchored mapping it merged in place (its merged keys
    put before its own), so the duplicate check, when it reached that mapping afterwards, said
    a key it overrides "appears twice"; a key written twice in a nested mapping is refused."""
    chained = tmp_path / "chained.yaml"
    chained.write_text(
        "serve:\n  engine:\n    vllm_engine_kwargs:\n      presets:\n        small: &small\n"
        "          <<: {max_num_seqs: 64, gpu_memory_utilization: 0.8}\n"
        "          max_num_seqs: 32\n"
        "      chosen:\n        <<: *small\n"
    )
    kwargs = load_config(chained).serve.engine.vllm_engine_kwargs
    small = {"max_num_seqs": 32, "gpu_memory_utilization": 0.8}
    assert kwargs == {"presets": {"small": small}, "chosen": small}
    twice = tmp_path / "twice.yaml"
    twice.write_text("serve:\n  engine:\n    vllm_engine_kwargs: [{a: 1, a: 2}]\n")
    with pytest.raises(ConfigError, match="at line 3, column 33: the key 'a' appears twice"):
        load_config(twice)


def test_a_file_a_key_names_is_refused_with_the_key(tmp_path, monkeypatch):
    from soulray.eval.judge import load_rubric
    from soulray.synth.roles import load_prompts
    from soulray.synth.scenarios import load_pool
    from soulray.synth.strategies import load_taxonomy

    missing = str(tmp_path / "nope.yaml")
    for load, key in [
        (load_taxonomy, "synth.taxonomy_file"),
        (load_prompts, "synth.prompts_file"),
        (load_pool, "synth.scenarios.pool_file"),
    ]:
        with pytest.raises(ValueError, match=f"^{key}={missing}: no such file; give the path"):
            load(missing)
        with pytest.raises(ValueError, match=f"^{key}=s3://b/x.yaml: give a local file"):
            load("s3://b/x.yaml")
    # ~ is the home folder, as in data.inputs and every other path
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("strategies", "prompts", "scenarios"):
        (tmp_path / f"{name}.yaml").write_bytes(
            (ROOT / "soulray/synth" / f"{name}.yaml").read_bytes()
        )
    assert load_taxonomy("~/strategies.yaml").names == load_taxonomy().names
    assert load_prompts("~/prompts.yaml") == load_prompts()
    assert load_pool("~/scenarios.yaml") == load_pool()
    (tmp_path / "rubric.yaml").write_bytes(
        (ROOT / "soulray/eval/rubrics/soulchat.yaml").read_bytes()
    )
    assert load_rubric("~/rubric.yaml") == load_rubric("soulchat")


def test_the_error_shown_is_the_one_raised_not_the_one_it_hid(tmp_path):
    """`raise ValueError(...) from None` inside an OSError handler: the CLI prints the
    ValueError (it names the option and the fix), not the OSError it replaced."""
    from typer.testing import CliRunner

    from soulray.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "sub" / "serve.yaml"  # a folder cannot be made under a file
    config = str(Path(__file__).parents[1] / "jobs" / "quickstart.yaml")
    result = CliRunner().invoke(app, ["serve", "build", "--config", config, "-o", str(out)])
    assert result.exit_code == 1
    assert f"error: --output {out}: cannot create its folder" in result.output
    made = tmp_path / "new" / "serve.yaml"  # a missing folder is made
    result = CliRunner().invoke(app, ["serve", "build", "--config", config, "-o", str(made)])
    assert result.exit_code == 0 and made.read_text().startswith("# Ray Serve config")


def test_a_section_written_inside_another_is_pointed_at_its_own_place():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lora.enabled=true"])  # used to suggest 'train.lr'
    assert "unknown config key 'train.lora'. 'lora' is a section of its own: write 'lora.…', " in (
        str(info.value)
    )
    assert "train.lr" not in str(info.value).split("Valid keys")[0]
