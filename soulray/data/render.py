"""Render a conversation with the tokenizer's chat template into input_ids and labels.

The conversation is rendered once, as text, with every message; the text is tokenized once with
character offsets. Labels are -100 everywhere except the tokens of each trained assistant turn:
its content (with the optional "[Strategy] " tag) and the end-of-turn marker that follows it, so
the model learns both what to say and when to stop. User, system and template tokens are never
targets. A conversation longer than seq_len is cut into windows at message boundaries so every
assistant turn is a target exactly once, with as much preceding context as fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from soulray.data.conversation import Conversation, RecordError

IGNORE = -100

# ChatML (the Qwen family's format): the template of the tokenizer soulray trains itself.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# For a tokenizer without a chat template (a base model): role headers as plain text and the
# tokenizer's own eos token closing every message, so generation stops where training taught it.
BUILTIN_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_PROBE_USER, _PROBE_ASSISTANT = "\u2063user-probe\u2063", "\u2063assistant-probe\u2063"


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the built-in one (needs an eos token)."""
    if tokenizer.chat_template:
        return
    if not tokenizer.eos_token:
        raise ValueError(
            "the tokenizer has neither a chat template nor an eos token, so soulray cannot tell "
            "where an assistant turn ends; use a tokenizer with a chat template or an eos token"
        )
    tokenizer.chat_template = BUILTIN_TEMPLATE


def find_end_of_turn(tokenizer: Any) -> str:
    """The text the template writes right after an assistant message (e.g. '<|im_end|>')."""
    probe = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ASSISTANT},
    ]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    end = text.index(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT)
    eot = text[end:].strip()
    if not eot:
        raise ValueError(
            "the chat template writes nothing after an assistant message, so the model could "
            "never learn to stop; use a template that ends assistant turns with an eos token"
        )
    return eot


@dataclass(slots=True)
class Rendered:
    """One rendered conversation.

    `bounds[i]` is the token index where message i ends (its end-of-turn marker included); the
    next message's header belongs to the next message. `prefix` is where the leading system
    messages end: every window repeats tokens [0, prefix).
    """

    input_ids: list[int]
    labels: list[int]
    bounds: list[int]
    prefix: int
    targets: list[int]  # indices of trained assistant messages


@dataclass(slots=True)
class Sequence:
    """One training sequence (a whole conversation or one window of it)."""

    input_ids: list[int]
    labels: list[int]
    assistant_turns: int  # assistant turns first trained in this sequence


def template_messages(conv: Conversation, strategy_tags: bool) -> list[dict[str, str]]:
    out = []
    for m in conv.messages:
        content = m.content
        if strategy_tags and m.role == "assistant" and m.strategy:
            content = f"[{m.strategy}] {content}"
        out.append({"role": m.role, "content": content})
    return out


def render_conversation(
    tokenizer: Any, conv: Conversation, eot: str, strategy_tags: bool = False
) -> Rendered:
    messages = template_messages(conv, strategy_tags)
    text, located = _render_text(tokenizer, messages, conv.id)
    spans, ends, targets = [], [], []
    seen_user = False
    for i, (m, (start, end)) in enumerate(zip(messages, located, strict=True)):
        marker = end + len(eot) if text.startswith(eot, end) else end
        seen_user = seen_user or m["role"] == "user"
        if m["role"] == "assistant" and seen_user:
            spans.append((start, marker))
            targets.append(i)
        ends.append(marker)
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    labels = _label_spans(enc.ids, enc.offsets, spans)
    bounds = _char_to_token_bounds(enc.offsets, ends)
    bounds[-1] = len(enc.ids)  # the template's trailing text belongs to the last message
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if n_system:
        prefix = bounds[n_system - 1]
    else:  # no system prompt: the prefix every window repeats is just the bos token, if any
        bos = tokenizer.bos_token_id
        prefix = int(bos is not None and enc.ids[:1] == [bos])
    return Rendered(list(enc.ids), labels, bounds, prefix, targets)


def _render_text(
    tokenizer: Any, messages: list[dict[str, str]], conv_id: str
) -> tuple[str, list[tuple[int, int]]]:
    """The template's text and each message content's (start, end) character span in it.

    The template is rendered with a unique placeholder per content, then the contents are put in
    their place: searching for the contents themselves would mistake a short reply such as "a"
    for the "a" of the header "assistant" before it (and mask the wrong tokens).
    """
    marks = [f"\u2063{i}\u2063" for i in range(len(messages))]
    probe = [m | {"content": mark} for m, mark in zip(messages, marks, strict=True)]
    skeleton = tokenizer.apply_chat_template(probe, tokenize=False)
    parts, located, cursor, length = [], [], 0, 0
    for i, (m, mark) in enumerate(zip(messages, marks, strict=True)):
        at = skeleton.find(mark, cursor)
        if at < 0:
            raise ValueError(
                f"conversation {conv_id}: the chat template changed message {i}'s content, so "
                "its tokens cannot be located; use a template that writes contents verbatim"
            )
        length += at - cursor
        located.append((length, length + len(m["content"])))
        length += len(m["content"])
        parts += [skeleton[cursor:at], m["content"]]
        cursor = at + len(mark)
    return "".join([*parts, skeleton[cursor:]]), located


def _label_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
    """Copy ids into labels for tokens that start inside a target span; -100 elsewhere."""
    labels = [IGNORE] * len(ids)
    s = 0
    for t, (start, _) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if start >= spans[s][0]:
            labels[t] = ids[t]
    return labels


def _char_to_token_bounds(offsets: list[tuple[int, int]], ends: list[int]) -> list[int]:
    """For each character boundary, the index of the first token starting at or after it."""
    bounds, t = [], 0
    for end in ends:
        while t < len(offsets) and offsets[t][0] < end:
            t += 1
        bounds.append(t)
    return bounds


def split_windows(r: Rendered, seq_len: int) -> list[Sequence]:
    """Cut a rendered conversation into sequences of at most seq_len tokens.

    Each window is the system prefix plus a run of whole messages ending on an assistant turn.
    A window starts as early as its first new target allows and then extends forward; assistant
    turns already trained in an earlier window are context only (labels -100) in later ones.
    A single message that cannot fit even alone is truncated (its tail is lost).
    """
    n = len(r.input_ids)
    if n <= seq_len:
        return [Sequence(r.input_ids, r.labels, len(r.targets))]
    starts = [r.prefix, *r.bounds[:-1]]  # message i spans [starts[i], bounds[i])
    first = next((i for i, b in enumerate(r.bounds) if b > r.prefix), len(r.bounds))
    budget = seq_len - r.prefix
    if budget <= 0:
        raise RecordError(
            "too_long",
            f"the system prompt alone is {r.prefix} tokens, more than "
            f"data.seq_len={seq_len}; raise data.seq_len or shorten the prompt",
        )
    out: list[Sequence] = []
    pending = list(r.targets)
    while pending:
        target = pending[0]
        lo = target
        while lo > first and r.bounds[target] - starts[lo - 1] <= budget:
            lo -= 1
        hi = target
        for j in pending[1:]:
            if r.bounds[j] - starts[lo] > budget:
                break
            hi = j
        trained = [j for j in pending if j <= hi]
        pending = pending[len(trained) :]
        out.append(_window(r, starts, lo, hi, trained, seq_len))
    return out


def _window(
    r: Rendered, starts: list[int], lo: int, hi: int, trained: list[int], seq_len: int
) -> Sequence:
    ids = r.input_ids[: r.prefix] + r.input_ids[starts[lo] : r.bounds[hi]]
    labels = [IGNORE] * r.prefix
    trained_set = set(trained)
    for i in range(lo, hi + 1):
        seg = slice(starts[i], r.bounds[i])
        labels += r.labels[seg] if i in trained_set else [IGNORE] * (seg.stop - seg.start)
    return Sequence(ids[:seq_len], labels[:seq_len], len(trained))
