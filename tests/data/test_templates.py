"""Chat templates other than ChatML: Llama 2's end-of-turn after a space is trained, a template
that refuses one conversation rejects that record (not the job), and one without a system role
is usable unless data.system_prompt needs it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from soulray.config import DataConfig
from soulray.data.conversation import Conversation, Message
from soulray.data.pipeline import RenderPacker, check_template
from soulray.data.render import (
    IGNORE,
    find_end_of_turn,
    render_conversation,
    template_system_prompt,
)
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
    """The rejects go to a file in the work directory: the stats row the driver gets holds their
    counts, never a record's text (a template refusing most records put most of the corpus in
    the driver's memory)."""
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
    refused = "the model's chat template refused it: "
    alternate = "Conversation roles must alternate user/assistant/user/assistant/..."
    path = f"{tmp_path}/out/_work/render_rejects/train-part-0123456789abcdef.jsonl"
    assert json.loads(stats["rejects"]) == {
        "count": 2,
        "reasons": {"template_error": 2},
        "turns": 6,
        "target_turns": 2,  # the greeting opening "greeting" answers nothing
        "file": path,
        "first": f"corpus.jsonl:2: template_error: {refused}{alternate}",
    }
    rejects = [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]
    assert [list(r) for r in rejects] == [["reason", "detail", "location", "record"]] * 2
    assert [(r["location"], r["reason"], r["record"]) for r in rejects] == [
        ("corpus.jsonl:2", "template_error", GREETING.to_json()),
        ("corpus.jsonl:3", "template_error", SYSTEM.to_json()),
    ]
    assert rejects[0]["detail"] == refused + alternate
    assert rejects[1]["detail"].endswith("System role not supported")


def test_a_template_without_a_system_role_is_refused_only_with_a_system_prompt(
    llama2, caplog
) -> None:
    with caplog.at_level("WARNING", logger="soulray.prepare"):
        check_template(llama2)
    assert "the chat template refuses system messages (System role not supported)" in caplog.text
    with pytest.raises(ValueError, match="^data.system_prompt is set, but the model's chat"):
        check_template(llama2, "Be kind.")


def test_a_template_that_moves_the_system_message_is_treated_as_one_without_it(caplog) -> None:
    """Mistral v0.3's shape writes the system message into the last user turn: its content is
    not where the message is, so it cannot be located. That failed the check (and would have
    failed a render actor) with a ValueError; it is now a template error: a warning without
    data.system_prompt, and each conversation with a system message a template_error reject."""
    tok = train_tokenizer(TEXT, vocab_size=300)
    tok.chat_template = (
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.last and sys %}{{ sys }}\n\n{% endif %}{{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    )
    with caplog.at_level("WARNING", logger="soulray.prepare"):
        check_template(tok)
    assert "the chat template refuses system messages (conversation check: the chat template " in (
        caplog.text
    )
    with pytest.raises(ValueError, match="^data.system_prompt is set, but the model's chat"):
        check_template(tok, "Be kind.")


# Qwen2.5's shape: its own system prompt when the conversation has none.
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}{%- endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_templates_own_system_prompt_opens_every_window(tmp_path, monkeypatch) -> None:
    """Serving always gets the template's default system prompt; training used to see it only
    in a conversation's first window. Now every window (every row here) opens with it, and a
    conversation's own system message still wins."""
    tok = train_tokenizer(TEXT, vocab_size=300)
    tok.chat_template = QWEN
    assert template_system_prompt(tok) == QWEN_DEFAULT
    assert template_system_prompt(llama2_like := train_tokenizer(TEXT, vocab_size=300)) is None
    llama2_like.chat_template = LLAMA2
    assert template_system_prompt(llama2_like) is None  # no system role at all
    saved = tmp_path / "tok"
    tok.save_pretrained(saved)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = DataConfig(seq_len=200, mode="padded")
    packer = RenderPacker(tokenizer_files(saved), cfg, str(tmp_path / "out"), False)
    turns = [(role, TEXT[i % 3]) for i in range(4) for role in ("user", "assistant")]
    convs = [conv("long", *turns), conv("own", ("system", "Be kind."), *turns[:2])]
    part = pa.table(
        {
            "conversation": [c.to_json() for c in convs],
            "location": ["corpus.jsonl:1", "corpus.jsonl:2"],
            "split": ["train"] * 2,
            "hash": ["0123456789abcdef0123"] * 2,
        }
    )
    stats = packer.write_shard("train", part)
    assert stats["conversations"] == 2 and json.loads(stats["rejects"]) == {"count": 0}
    staged = tmp_path / "out" / "train" / "_blocks" / "part-0123456789abcdef.parquet"
    rows = pq.read_table(staged).column("input_ids").to_pylist()
    texts = sorted(tok.decode(ids, skip_special_tokens=False) for ids in rows)
    opening = f"<|im_start|>system\n{QWEN_DEFAULT}<|im_end|>\n<|im_start|>"
    assert len(texts) == 5  # 4 windows of "long", 1 of "own"
    assert [t.startswith(opening) for t in texts].count(True) == 4
    assert sum(t.startswith("<|im_start|>system\nBe kind.") for t in texts) == 1
