"""A per-turn-expanded corpus (one sample per reply, each the dialogue so far, as SoulChat built
its 2.3M samples) in ONE JSON array, prepared as many byte ranges: it collapses to its longest
dialogues with exact counts, and no prefix of a validation dialogue trains, also where two
dialogues branch from one shared prefix."""

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
BRANCH_EVERY = 3  # every 3rd dialogue of 2+ exchanges gets another continuation (id + 1000)
VAL_FRACTION = 0.3


def dialogue(i: int, exchanges: int) -> list[dict[str, str]]:
    messages = []
    for j in range(exchanges):
        messages.append(
            {"role": "user", "content": f'dialogue {i} worry {j}: I feel [low], "why"?'}
        )
        messages.append({"role": "assistant", "content": f"reply {j} to {i}: tell me {{more}}\\"})
    return messages


def as_conversation(messages: list[dict[str, str]]) -> Conversation:
    return Conversation("x", "t", None, [Message(m["role"], m["content"]) for m in messages])


def content_hash(messages: list[dict[str, str]]) -> str:
    return as_conversation(messages).content_hash()


def branch(i: int, messages: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """Another continuation of dialogue i (of 2+ exchanges): its first 1..n-1 exchanges, then
    replies of its own. (A 1-exchange dialogue would be a prefix of its branch: collapsed.)"""
    shared = 2 * rng.randint(1, len(messages) // 2 - 1)
    return messages[:shared] + dialogue(1000 + i, rng.randint(1, 3))


@pytest.fixture(scope="module")
def expanded(ray_local, tmp_path_factory):
    rng = random.Random(0)
    full = {i: dialogue(i, rng.randint(1, 6)) for i in range(DIALOGUES)}
    branched = [i for i in range(0, DIALOGUES, BRANCH_EVERY) if len(full[i]) >= 4]
    full |= {1000 + i: branch(i, full[i], rng) for i in branched}
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
    assert m["conversations"] == len(full) > DIALOGUES
    assert m["collapsed_prefixes"] == sum(k - 1 for k in exchanges.values())
    assert m["rejected"] == {"duplicate": len(duplicated)}
    assert m["assistant_turns"] == sum(exchanges.values())
    assert m["turns"] == 2 * sum(exchanges.values())


def test_each_dialogue_lands_whole_on_one_side(expanded):
    """Per split, exactly the longest dialogues whose split hash (their opening's) says so:
    their conversations and assistant turns. A prefix sample of a val dialogue in train would
    add turns to train."""
    full, _, _, _, _, m = expanded
    convs, turns = Counter(), Counter()
    for msgs in full.values():
        side = split_of(as_conversation(msgs).split_hash(), VAL_FRACTION)
        convs[side] += 1
        turns[side] += len(msgs) // 2
    assert convs["val"] > 10 and convs["train"] > 10  # both sides occur
    for side in ("train", "val"):
        assert m["splits"][side]["conversations"] == convs[side]
        assert m["splits"][side]["assistant_turns"] == turns[side]


def test_branches_of_one_prefix_share_a_side(expanded):
    """Two dialogues that continue one shared prefix differently: keyed by their whole content
    they would straddle the split (the shared prefix then training while a val dialogue starts
    with it); keyed by their opening they never do."""
    full, *_ = expanded
    pairs = [(full[i - 1000], full[i]) for i in full if i >= 1000]
    whole = [[split_of(content_hash(d), VAL_FRACTION) for d in p] for p in pairs]
    opening = [[split_of(as_conversation(d).split_hash(), VAL_FRACTION) for d in p] for p in pairs]
    assert sum(a != b for a, b in whole) == 7  # the old keying: 7 of 22 trees straddled
    assert all(a == b for a, b in opening)


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
