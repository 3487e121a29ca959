"""A per-turn-expanded corpus (one sample per reply, each the dialogue so far, as SoulChat built
its 2.3M samples) in ONE JSON array, prepared as many byte ranges: it collapses to its longest
dialogues with exact counts, and no prefix of a validation dialogue trains."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from soulray.config import load_config
from soulray.data.conversation import Conversation, Message
from soulray.data.parse import split_of
from soulray.data.pipeline import run_prepare

DIALOGUES = 80
VAL_FRACTION = 0.3


def dialogue(i: int, exchanges: int) -> list[dict[str, str]]:
    messages = []
    for j in range(exchanges):
        messages.append(
            {"role": "user", "content": f'dialogue {i} worry {j}: I feel [low], "why"?'}
        )
        messages.append({"role": "assistant", "content": f"reply {j} to {i}: tell me {{more}}\\"})
    return messages


def content_hash(messages: list[dict[str, str]]) -> str:
    return Conversation(
        "x", "t", None, [Message(m["role"], m["content"]) for m in messages]
    ).content_hash()


@pytest.fixture(scope="module")
def expanded(ray_local, tmp_path_factory):
    rng = random.Random(0)
    full = {i: dialogue(i, rng.randint(1, 6)) for i in range(DIALOGUES)}
    samples = [
        {"id": f"{i}-{j}", "messages": messages[: 2 * j]}
        for i, messages in full.items()
        for j in range(1, len(messages) // 2 + 1)
    ]
    duplicated = [3, 7, 11]  # full dialogues present twice, under other ids
    samples += [{"id": f"dup-{i}", "messages": full[i]} for i in duplicated]
    rng.shuffle(samples)
    root = tmp_path_factory.mktemp("expanded")
    path = root / "soulchat_expanded.json"
    path.write_text(json.dumps(samples, ensure_ascii=False, indent=2), encoding="utf-8")
    cfg = load_config(
        None,
        [
            f"data.inputs={json.dumps([str(path)])}",
            f"data.output_dir={root / 'out'}",
            "data.seq_len=512",
            f"data.val_fraction={VAL_FRACTION}",
            "data.tokenizer_vocab_size=300",
            "data.range_bytes=8192",  # about 30 ranges of whole records
            "data.num_workers=2",
        ],
    )
    manifest = run_prepare(cfg)
    return full, samples, duplicated, path, root / "out", manifest


def test_expanded_corpus_collapses_to_its_dialogues(expanded):
    full, samples, duplicated, _, _, m = expanded
    exchanges = {i: len(msgs) // 2 for i, msgs in full.items()}
    assert m["records"] == len(samples) == sum(exchanges.values()) + len(duplicated)
    assert m["conversations"] == DIALOGUES
    assert m["collapsed_prefixes"] == sum(k - 1 for k in exchanges.values())
    assert m["rejected"] == {"duplicate": len(duplicated)}
    assert m["assistant_turns"] == sum(exchanges.values())
    assert m["turns"] == 2 * sum(exchanges.values())


def test_each_dialogue_lands_whole_on_one_side(expanded):
    """Per split, exactly the longest dialogues whose hash says so: their conversations and
    assistant turns. A prefix sample of a val dialogue in train would add turns to train."""
    full, _, _, _, _, m = expanded
    convs, turns = Counter(), Counter()
    for msgs in full.values():
        side = split_of(content_hash(msgs), VAL_FRACTION)
        convs[side] += 1
        turns[side] += len(msgs) // 2
    assert convs["val"] > 10 and convs["train"] > 10  # both sides occur
    for side in ("train", "val"):
        assert m["splits"][side]["conversations"] == convs[side]
        assert m["splits"][side]["assistant_turns"] == turns[side]


def test_duplicates_name_the_first_copy_in_file_order(expanded):
    full, samples, duplicated, path, out, _ = expanded
    lines = [json.loads(x) for x in (out / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert len(lines) == len(duplicated) and {r["reason"] for r in lines} == {"duplicate"}
    index = {}
    for k, s in enumerate(samples):
        index.setdefault(content_hash(s["messages"]), []).append(k)
    expected = sorted(
        (
            f"{path}[{index[content_hash(full[i])][1]}]",
            f"same messages as {path}[{index[content_hash(full[i])][0]}]",
        )
        for i in duplicated
    )
    assert sorted((r["location"], r["detail"]) for r in lines) == expected
    assert not (out / "_work").exists()  # the intermediate rows are gone
