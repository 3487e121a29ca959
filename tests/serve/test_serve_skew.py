"""No train/serve skew: the export records the system prompt and end-of-turn marker training
used; serving repeats them by default (an override is allowed and logged), and generation stops
at the template's end-of-turn token even where that token is not eos (Gemma-shaped template)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import torch

from soulray.config import ServeConfig
from soulray.data.render import build_serving_record
from soulray.serve.app import build_state
from soulray.serve.chat import prepare
from soulray.serve.generate import GenRequest, decode, eos_ids, generate_text, load_model
from soulray.serve.prompt import read_export_info, render_ids
from soulray.serve.schemas import ChatCompletionRequest
from soulray.serve.tiny import build_tiny_export
from soulray.train.checkpoint import build_generation_config

TRAINED = "Be brief and kind."
GEMMA_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)


def served_prompt(export, tmp_path, **serve) -> str:
    state = build_state(ServeConfig(**serve), str(export), engine=None)
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    ids = prepare(state, req, "chatcmpl-test").gen.prompt_ids
    return state.tokenizer.decode(ids)


def test_the_export_records_the_training_prompt_and_serving_uses_it(tmp_path, caplog):
    export = build_tiny_export(tmp_path / "export", system_prompt=TRAINED)
    record = json.loads((export / "serving.json").read_text())
    assert record["system_prompt"] == TRAINED and record["end_of_turn"] == "<|im_end|>"
    assert len(record["end_of_turn_ids"]) == 1
    expected = "<|im_start|>system\n" + TRAINED + "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    with caplog.at_level(logging.WARNING, logger="ray.serve.soulray"):
        assert served_prompt(export, tmp_path) == expected + "<|im_start|>assistant\n"
    assert not [r for r in caplog.records if "overrides" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="ray.serve.soulray"):
        assert "system\nOther<|im_end|>" in served_prompt(export, tmp_path, system_prompt="Other")
    (warning,) = [r.getMessage() for r in caplog.records if "overrides" in r.getMessage()]
    assert "serve.system_prompt" in warning and "5 chars instead of 18" in warning
    bare = served_prompt(export, tmp_path, system_prompt="")  # deliberately none
    assert bare == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_an_export_from_before_the_record_takes_the_prompt_from_its_config(tmp_path):
    export = build_tiny_export(tmp_path / "export", system_prompt=TRAINED)
    (export / "serving.json").unlink()
    info = read_export_info(str(export), ServeConfig())
    assert (info.system_prompt, info.end_of_turn) == (TRAINED, "<|im_end|>")
    untrained = build_tiny_export(tmp_path / "plain")  # trained without a system prompt
    assert read_export_info(str(untrained), ServeConfig()).system_prompt is None


def build_gemma_shaped_export(tiny_export, directory) -> tuple[int, list[int]]:
    """The tiny export with a Gemma-shaped template whose turn ends with <end_of_turn>, a new
    special token that is not eos, and an output head that picks <end_of_turn> first for the
    prompt returned (so a reply that stops there is empty)."""
    model, tok, _ = load_model(str(tiny_export), None, "float32")
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    model.resize_token_embeddings(len(tok))
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=False)
    head.weight.data.copy_(model.get_input_embeddings().weight.data)
    model.lm_head = head
    ids = render_ids(tok, [{"role": "user", "content": "hi"}], "")
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0][0, -1]))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    hook.remove()
    with torch.no_grad():
        model.lm_head.weight[eot] = 50 * seen[0] / seen[0].norm()
    model.generation_config.eos_token_id = tok.eos_token_id  # an export that names eos only
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return eot, ids


def test_generation_stops_at_an_end_of_turn_token_that_is_not_eos(tiny_export, tmp_path):
    eot, ids = build_gemma_shaped_export(tiny_export, tmp_path / "gemma")
    model, tok, device = load_model(str(tmp_path / "gemma"), None, "float32")
    assert eot != tok.eos_token_id and model.generation_config.eos_token_id == tok.eos_token_id
    assert eot in eos_ids(model, tok)
    req = GenRequest("g", ids, 5, 0.0, 1.0)
    stopped = generate_text(model, tok, req, device)
    assert (stopped.text, stopped.tokens, stopped.finish_reason) == ("", 0, "stop")
    # What eos alone would do: <end_of_turn> is sampled (and hidden) until max_tokens.
    steps = list(decode(model, tok, [req], {tok.eos_token_id}, device))
    assert steps[-1][0].finish_reason == "length" and steps[-1][0].tokens == 5
    # A new export names both in generation_config.json, so vLLM and transformers stop too.
    record = build_serving_record(tok, None)
    assert record["end_of_turn"] == "<end_of_turn>" and record["end_of_turn_ids"] == [eot]
    gen = build_generation_config(tok, record["end_of_turn_ids"])
    assert gen.eos_token_id == [tok.eos_token_id, eot]


def test_the_export_merges_a_hub_base_models_generation_config(tiny_export, tmp_path) -> None:
    """A hub id base (model.name_or_path=Qwen/...) lost its generation config: only a local
    folder's was read. Here the hub's cache holds it, as after the workers read the weights."""
    snapshot = tmp_path / "hub" / "models--org--base" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--org--base" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--base" / "refs" / "main").write_text("a" * 40)
    (snapshot / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.8, "eos_token_id": [3, 4]})
    )
    code = (
        "import sys; from transformers import AutoTokenizer\n"
        "from soulray.train.checkpoint import build_generation_config\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "for base in ('org/base', 'org/other'):\n"
        "    g = build_generation_config(tok, [5], base)\n"
        "    print(g.eos_token_id, g.temperature, g.top_p)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_export)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_export).eos_token_id
    theirs = [3, 4, *[i for i in (eos, 5) if i not in (3, 4)]]
    assert out.stdout.splitlines() == [f"{theirs} 0.6 0.8", f"{[eos, 5]} 0.7 0.9"]


def test_the_export_keeps_a_local_base_models_generation_config_and_adds_its_stops(
    tiny_export, tmp_path
):
    """A base such as Qwen2.5-Instruct stops at <|im_end|> and <|endoftext|> and ships its
    sampling settings: the export kept only eos and the end-of-turn token, and soulray's own
    sampling, so vLLM (which reads generation_config.json) lost a stop and the settings."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_export)
    base = tmp_path / "base"
    GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.05, eos_token_id=[3, 4]
    ).save_pretrained(base)
    gen = build_generation_config(tok, [5], str(base))
    assert gen.eos_token_id == [3, 4, *[i for i in (tok.eos_token_id, 5) if i not in (3, 4)]]
    assert (gen.temperature, gen.top_p, gen.repetition_penalty) == (0.7, 0.8, 1.05)
    assert gen.pad_token_id == tok.pad_token_id
    ours = build_generation_config(tok, [5], str(tmp_path / "no-such-base"))
    assert (ours.temperature, ours.top_p, ours.repetition_penalty) == (0.7, 0.9, None)
    greedy = tmp_path / "greedy"  # Qwen2.5-7B's own: greedy, a long max_new_tokens
    GenerationConfig(
        bos_token_id=3, do_sample=False, eos_token_id=3, max_new_tokens=2048
    ).save_pretrained(greedy)
    gen = build_generation_config(tok, [5], str(greedy))
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.max_new_tokens) == (True, 0.7, 0.9, 256)
    assert gen.eos_token_id == [3, *[i for i in (tok.eos_token_id, 5) if i != 3]]
    gen.save_pretrained(tmp_path / "export")  # a valid config (it raised here at export)
    plain = tmp_path / "plain"  # a base model's save_pretrained: stops alone, no sampling
    GenerationConfig(eos_token_id=3, bos_token_id=1).save_pretrained(plain)
    gen = build_generation_config(tok, [5], str(plain))
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.max_new_tokens) == (True, 0.7, 0.9, 256)
    assert gen.eos_token_id == [3, *[i for i in (tok.eos_token_id, 5) if i != 3]]
    assert gen.bos_token_id == tok.bos_token_id
