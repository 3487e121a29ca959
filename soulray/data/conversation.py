"""The canonical conversation every corpus format is read into, and how it is cleaned.

Cleaning is a pure function so its counts can be asserted exactly: strip whitespace, drop empty
turns, merge consecutive turns of one role (keeping the first strategy label), normalise strategy
names onto the taxonomy, and reject conversations that cannot teach anything (no messages, or no
assistant turn after the first user turn; a leading assistant greeting is kept as context).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from soulray.config import DEFAULT_STRATEGY_ALIASES, StrategyConfig
from soulray.text import SURROGATE

Role = Literal["system", "user", "assistant"]

# Why a record was not kept. Every rejected record lands in rejects.jsonl with one of these.
REJECT_REASONS = (
    "invalid_json",  # the line or file does not parse as JSON
    "invalid_encoding",  # the line or record is not UTF-8 (a GBK file, say)
    "unknown_format",  # parses, but matches no known corpus shape
    "invalid_record",  # known shape with wrong types or missing fields
    "empty_conversation",  # nothing left after dropping empty turns
    "no_assistant_turn",  # no assistant reply to learn from
    "duplicate",  # same messages as an earlier conversation
    "too_long",  # its system prompt alone does not fit in data.seq_len (found when rendering)
    "control_token",  # a message holds the tokenizer's special token as text (found rendering)
)


class RecordError(ValueError):
    """A record that cannot be read; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Message:
    role: Role
    content: str
    strategy: str | None = None


@dataclass(slots=True)
class Conversation:
    id: str
    source: str
    topic: str | None
    messages: list[Message]

    def to_json(self) -> str:
        messages = [
            {"role": m.role, "content": m.content}
            | ({"strategy": m.strategy} if m.strategy else {})
            for m in self.messages
        ]
        record = {"id": self.id, "source": self.source, "topic": self.topic, "messages": messages}
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        d = json.loads(text)
        messages = [Message(m["role"], m["content"], m.get("strategy")) for m in d["messages"]]
        return cls(d["id"], d["source"], d.get("topic"), messages)

    def content_hash(self) -> str:
        """Hash of the roles and contents only: the identity used for dedup."""
        return self.content_hashes()[0]

    def split_hash(self) -> str:
        """The hash that assigns the conversation to train or val: its opening's."""
        return self.content_hashes()[2]

    def content_hashes(self) -> tuple[str, list[str], str]:
        """The content hash; the content hash every proper prefix ending with an assistant
        turn would have (a per-turn-expanded corpus, one sample per reply, each the dialogue so
        far, has its samples' hashes among the prefixes of the longest one); and the split
        hash: that of the opening, every message up to and including the first user turn.

        The split is keyed by the opening, not the whole dialogue: dialogues that branch from a
        shared beginning (two continuations of one prefix, as per-turn-expanded corpora hold)
        share every prefix from the opening on, so they land on one side together and no prefix
        of a validation dialogue trains as a prefix of a training one.

        The content hash ends at the last assistant turn: user turns after it train nothing, so
        a sample "u1 a1 u2" of the dialogue "u1 a1 u2 a2" is the prefix "u1 a1" (it was kept,
        and a1 trained twice), and two records that differ only there are duplicates."""
        h = hashlib.blake2b(digest_size=16)
        prefixes = []
        opening = digest = None
        roles = [m.role for m in self.messages]
        last = len(roles) - 1 - roles[::-1].index("assistant") if "assistant" in roles else None
        for i, m in enumerate(self.messages):
            h.update(m.role.encode())
            h.update(b"\x00")
            h.update(m.content.encode())
            h.update(b"\x01")
            if m.role == "assistant" and last is not None and i < last:
                prefixes.append(h.copy().hexdigest())
            if i == last:
                digest = h.copy().hexdigest()
            if opening is None and m.role == "user":
                opening = h.copy().hexdigest()
        digest = digest or h.hexdigest()
        return digest, prefixes, opening or digest


def check_encodable(conv: Conversation) -> None:
    """Refuse text that has no UTF-8 form: a JSON escape of one half of a UTF-16 pair
    ("\\ud83d" without its partner, a broken emoji from a truncated export) decodes to a lone
    surrogate, which no Parquet file, hash or rejects line can hold."""
    fields = [("id", conv.id), ("source", conv.source), ("topic", conv.topic or "")]
    for i, m in enumerate(conv.messages):
        fields += [
            (f"messages[{i}].content", m.content),
            (f"messages[{i}].strategy", m.strategy or ""),
        ]
    for where, value in fields:
        found = SURROGATE.search(value)
        if found:
            raise RecordError(
                "invalid_record",
                f"{where} has an unpaired UTF-16 surrogate {found.group()!r} at character "
                f"{found.start()} (half of an emoji or character, cut by a broken export); "
                "remove it or restore the whole character",
            )


@dataclass(slots=True)
class CleanStats:
    """What cleaning changed in one conversation (summed into the manifest)."""

    empty_turns: int = 0
    merged_turns: int = 0
    # a reply merged into the one before it whose strategy differed: the first one's label is
    # the merged reply's (one reply carries one strategy tag)
    strategies_dropped: int = 0
    unknown_strategies: dict[str, int] = field(default_factory=dict)


def build_strategy_lookup(cfg: StrategyConfig) -> dict[str, str]:
    """Lower-cased spelling -> canonical name, for the taxonomy itself and every alias."""
    lookup = {name.lower(): name for name in cfg.taxonomy}
    for alias, target in cfg.aliases.items():
        if target not in cfg.taxonomy:
            if DEFAULT_STRATEGY_ALIASES.get(alias) == target:
                continue  # a built-in ESConv spelling, for a taxonomy without its strategy
            raise ValueError(
                f"strategy alias {alias!r} points to {target!r}, which is not in "
                f"data.strategies.taxonomy {cfg.taxonomy}; add it there or fix the alias "
                "in data.strategies.aliases"
            )
        lookup[alias.lower()] = target
    if cfg.fallback not in cfg.taxonomy:
        raise ValueError(
            f"data.strategies.fallback {cfg.fallback!r} is not in data.strategies.taxonomy "
            f"{cfg.taxonomy}; set data.strategies.fallback to the one unknown names become"
        )
    return lookup


def normalize_strategy(
    raw: str | None, lookup: dict[str, str], fallback: str, stats: CleanStats
) -> str | None:
    if raw is None:
        return None
    key = raw.strip().strip("[]").strip()
    if not key:
        return None
    name = lookup.get(key.lower())
    if name is None:
        stats.unknown_strategies[key] = stats.unknown_strategies.get(key, 0) + 1
        return fallback
    return name


def clean_conversation(
    conv: Conversation, lookup: dict[str, str], fallback: str, system_prompt: str | None = None
) -> tuple[Conversation, CleanStats]:
    """Return the cleaned conversation and what changed; raise RecordError when nothing is left."""
    stats = CleanStats()
    merged: list[Message] = []
    for m in conv.messages:
        content = m.content.strip()
        if not content:
            stats.empty_turns += 1
            continue
        # only replies have a strategy (a user turn's label is dropped, not counted as unknown)
        strategy = (
            normalize_strategy(m.strategy, lookup, fallback, stats)
            if m.role == "assistant"
            else None
        )
        if merged and merged[-1].role == m.role:
            prev = merged[-1]
            prev.content = f"{prev.content}\n{content}"
            if prev.strategy and strategy and strategy != prev.strategy:
                stats.strategies_dropped += 1
            prev.strategy = prev.strategy or strategy
            stats.merged_turns += 1
        else:
            merged.append(Message(m.role, content, strategy))
    if not merged:
        raise RecordError("empty_conversation", "no non-empty turn")
    if system_prompt and merged[0].role != "system":
        merged.insert(0, Message("system", system_prompt))
    if count_target_turns(merged) == 0:
        raise RecordError("no_assistant_turn", "no assistant reply after a user turn")
    return Conversation(conv.id, conv.source, conv.topic, merged), stats


def count_target_turns(messages: list[Message]) -> int:
    """Assistant turns that are trained: those after the first user turn."""
    seen_user = False
    n = 0
    for m in messages:
        seen_user = seen_user or m.role == "user"
        n += seen_user and m.role == "assistant"
    return n
