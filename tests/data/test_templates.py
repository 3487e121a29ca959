"""Chat templates other than ChatML: Llama 2's end-of-turn after a space is trained, a template
that refuses one conversation rejects that record (not the job), and one without a system role
is usable unless data.system_prompt needs it."""

from __future__ import annotations

import json
import tempfile

import pyarrow as pa
import pytest

from soulray.config import DataConfig
from soulray.data.conversation import Conversation, Message
from soulray.data.pipeline import RenderPacker, check_template
from soulray.data.render import IGNORE, find_end_of_turn, render_conversation
from soulray.data.tokenizer import tokenizer_files, train_tokenizer

TEXT = [
    "I feel alone tonight and nobody seems to notice.",
    "I'm here with you. That sounds really heavy to carry on your own.",
    "Thanks for listening to me, it helps more than you think.",
]
# Llama 2's shape: [INST] user [/INST] assistant </s>; roles must alternate; no system role.
LLAMA2 = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def llama2():
    tok = train_tokenizer(TEXT, vocab_size=300)
    tok.chat_template = LLAMA2
    return tok


def conv(cid: str, *turns: tuple[str, str]) -> Conversation:
    return Conversation(cid, "test", None, [Message(role, text) for role, text in turns])


GOOD = conv("good", ("user", "I feel alone."), ("assistant", "I'm here."), ("user", "Thanks."),
            ("assistant", "Any time."))  # fmt: skip
GREETING = conv("greeting", ("assistant", "Hi."), ("user", "I feel alone."), ("assistant", "Hm."))
SYSTEM = conv("system", ("system", "Be kind."), ("user", "Hi."), ("assistant", "Hello."))


def test_an_end_of_turn_after_a_space_is_trained(llama2) -> None:
    eot = find_end_of_turn(llama2)
    assert eot == llama2.eos_token
    r = render_conversation(llama2, GOOD, eot)
    spans, current = [], []
    for token, label in zip(r.input_ids, r.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    spans += [current] if current else []
    assert [llama2.decode(s) for s in spans] == [f"I'm here. {eot}", f"Any time. {eot}"]


def test_a_refused_conversation_is_a_reject_not_a_failed_job(llama2, tmp_path, monkeypatch) -> None:
    saved = tmp_path / "tok"
    llama2.save_pretrained(saved)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    packer = RenderPacker(
        tokenizer_files(saved), DataConfig(seq_len=64), str(tmp_path / "out"), False
    )
    convs = [GOOD, GREETING, SYSTEM]
    part = pa.table(
        {
            "conversation": [c.to_json() for c in convs],
            "location": [f"corpus.jsonl:{i + 1}" for i in range(3)],
            "split": ["train"] * 3,
            "hash": ["0123456789abcdef0123"] * 3,
        }
    )
    assert list(temp.iterdir()) == []  # the tokenizer's files were removed once it was loaded
    stats = packer.write_shard("train", part)
    assert stats["conversations"] == 1
    rejects = json.loads(stats["rejects"])
    assert [(r["location"], r["reason"]) for r in rejects] == [
        ("corpus.jsonl:2", "template_error"),
        ("corpus.jsonl:3", "template_error"),
    ]
    assert rejects[0]["detail"] == (
        "the model's chat template refused it: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert rejects[1]["detail"].endswith("System role not supported")


def test_a_template_without_a_system_role_is_refused_only_with_a_system_prompt(
    llama2, caplog
) -> None:
    with caplog.at_level("WARNING", logger="soulray.prepare"):
        check_template(llama2)
    assert "the chat template refuses system messages (System role not supported)" in caplog.text
    with pytest.raises(ValueError, match="^data.system_prompt is set, but the model's chat"):
        check_template(llama2, "Be kind.")
