"""Render a conversation with the tokenizer's chat template into input_ids and labels.

The conversation is rendered once, as text, with every message; the text is tokenized once with
character offsets. Labels are -100 everywhere except the tokens of each trained assistant turn:
its content (with the optional "[Strategy] " tag) and the end-of-turn marker that follows it, so
the model learns both what to say and when to stop. User, system and template tokens are never
targets. A conversation longer than seq_len is cut into windows at message boundaries so every
assistant turn is a target exactly once, with as much preceding context as fits; one that does
not fit beside the message it answers is not a target at all (counted by prepare).
"""

from __future__ import annotations

import os
import re
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
_PROBE_USER_2 = "\u2063user-probe-2\u2063"


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
    """The text the template writes right after an assistant message (e.g. '<|im_end|>'): what
    follows a reply with another turn after it, as far as it agrees with what follows the last
    reply. A template may end the whole conversation with more (Phi-3's eos after its
    '<|end|>'): taken from the last reply alone, the marker was '<|end|>\n<|endoftext|>', which no
    earlier reply ends with, so their end was never trained."""
    from jinja2.exceptions import TemplateError

    one = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ASSISTANT},
    ]
    text = tokenizer.apply_chat_template(one, tokenize=False)
    last = text[text.index(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT) :]
    if not last.strip():
        raise ValueError(
            "the chat template writes nothing after an assistant message, so the model could "
            "never learn to stop; use a template that ends assistant turns with an eos token"
        )
    try:
        two = tokenizer.apply_chat_template(
            [*one, {"role": "user", "content": _PROBE_USER_2}, one[1]], tokenize=False
        )
    except TemplateError:
        return last.strip()
    start = two.index(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT)
    between = two[start : two.index(_PROBE_USER_2, start)]
    common = os.path.commonprefix([last, between])
    if common in (last, between):
        return common.strip() or last.strip()
    # cut where they part: at a special token's end, else at whitespace ("<|end|>\n<|")
    specials = [t for t in tokenizer.all_special_tokens if t and common.strip().endswith(t)]
    ends = [common.rstrip().rfind(t) + len(t) for t in specials]
    cut = max(ends) if ends else max(common.rfind(c) for c in " \t\r\n")
    return common[:cut].strip() if cut > 0 and common[:cut].strip() else last.strip()


SERVING_RECORD = "serving.json"  # in an export: how its conversations were rendered in training


def build_serving_record(tokenizer: Any, system_prompt: str | None) -> dict[str, Any]:
    """What serving must repeat exactly as training did: the system prompt added to
    conversations without one, and the end-of-turn marker (text and token ids) that ends a reply
    (which for Gemma-, Phi-3- or Llama-3-shaped templates is not the eos token)."""
    eot = find_end_of_turn(tokenizer)
    ids = tokenizer(eot, add_special_tokens=False).input_ids
    return {"system_prompt": system_prompt, "end_of_turn": eot, "end_of_turn_ids": ids}


@dataclass(slots=True)
class Rendered:
    """One rendered conversation.

    `bounds[i]` is the token index where message i ends (its end-of-turn marker included) and
    `starts[i]` where it begins: its header, after the line breaks the template wrote after the
    message before (they join a window only between two of its messages, so no window opens
    on a stray newline, nor ends on one unless it ends the conversation). `prefix` is where
    the leading system messages and the line break after them end: every window repeats
    tokens [0, prefix).
    """

    input_ids: list[int]
    labels: list[int]
    bounds: list[int]
    prefix: int
    targets: list[int]  # indices of trained assistant messages
    starts: list[int]


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


@dataclass(slots=True)
class Layout:
    """A conversation rendered as text: the character spans to train on and message ends."""

    text: str
    spans: list[tuple[int, int]]  # trained assistant contents + their end-of-turn marker
    ends: list[int]  # where each message (with its end-of-turn marker) ends
    begins: list[int]  # where each message's header begins
    targets: list[int]
    n_system: int


def layout_conversation(
    tokenizer: Any,
    conv: Conversation,
    eot: str,
    strategy_tags: bool = False,
    skeletons: dict[tuple[str, ...], str] | None = None,
) -> Layout:
    """The conversation as template text with its target spans; `skeletons` caches the
    template per role sequence across calls."""
    messages = template_messages(conv, strategy_tags)
    text, located = _render_text(tokenizer, messages, conv.id, skeletons)
    spans, ends, targets = [], [], []
    seen_user = False
    for i, (m, (start, end)) in enumerate(zip(messages, located, strict=True)):
        marker = end_of_turn_end(text, end, eot)
        seen_user = seen_user or m["role"] == "user"
        if m["role"] == "assistant" and seen_user:
            spans.append((start, marker))
            targets.append(i)
        ends.append(marker)
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    begins = [0, *(_past_line_breaks(text, end) for end in ends[:-1])]
    return Layout(text, spans, ends, begins, targets, n_system)


def _past_line_breaks(text: str, at: int) -> int:
    end = at
    while end < len(text) and text[end] in "\r\n":
        end += 1
    return end


def end_of_turn_end(text: str, end: int, eot: str) -> int:
    """Where a message's end-of-turn marker ends, if the template wrote one after its content
    (Llama 2's puts a space first: ' </s>'); else where the content ends."""
    at = end + len(text[end : end + 8]) - len(text[end : end + 8].lstrip(" \t\n"))
    return at + len(eot) if text.startswith(eot, at) else end


def tokenize_layouts(tokenizer: Any, layouts: list[Layout]) -> list[Rendered]:
    """Tokenize many rendered conversations in one batch (the tokenizer's own threads); labels
    and message bounds come from a few char -> token lookups, not a Python loop per token."""
    encodings = tokenizer.backend_tokenizer.encode_batch(
        [lay.text for lay in layouts], add_special_tokens=False
    )
    bos = tokenizer.bos_token_id
    out = []
    for lay, enc in zip(layouts, encodings, strict=True):
        ids = enc.ids
        n, text_len = len(ids), len(lay.text)
        labels = [IGNORE] * n
        for start, end in lay.spans:
            a = _span_start(enc, lay.text, start, n)
            b = _first_token_from(enc, end, n, text_len)
            labels[a:b] = ids[a:b]
        bounds = [_first_token_from(enc, c, n, text_len) for c in lay.ends]
        bounds[-1] = n  # the template's trailing text belongs to the last message
        starts = [0, *(_first_token_from(enc, c, n, text_len) for c in lay.begins[1:])]
        if lay.n_system:
            prefix = starts[lay.n_system] if lay.n_system < len(starts) else n
        else:  # no system prompt: the prefix every window repeats is just the bos token, if any
            prefix = int(bos is not None and ids[:1] == [bos])
        out.append(Rendered(ids, labels, bounds, prefix, lay.targets, starts))
    return out


def render_conversation(
    tokenizer: Any, conv: Conversation, eot: str, strategy_tags: bool = False
) -> Rendered:
    return tokenize_layouts(tokenizer, [layout_conversation(tokenizer, conv, eot, strategy_tags)])[
        0
    ]


def _span_start(enc: Any, text: str, char: int, n_tokens: int) -> int:
    """The first token of a reply's labels: the one holding its first character, also when
    that token starts in the template's whitespace before it (Llama 2's "[/INST] I'm": the
    token " I" is what the model says first, after the generation prompt "[/INST]")."""
    t = enc.char_to_token(char) if char < len(text) else None
    if t is not None:
        begin = enc.token_to_chars(t)[0]
        if begin < char and not text[begin:char].strip():
            return t
    return _first_token_from(enc, char, n_tokens, len(text))


def _first_token_from(enc: Any, char: int, n_tokens: int, text_len: int) -> int:
    """Index of the first token that starts at or after character `char` (a token that starts
    before it and runs across it belongs to the span before)."""
    while char < text_len:
        t = enc.char_to_token(char)
        if t is not None:
            return t if enc.token_to_chars(t)[0] >= char else t + 1
        char += 1
    return n_tokens


def _render_text(
    tokenizer: Any, messages: list[dict[str, str]], conv_id: str, cache: dict | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The template's text and each message content's (start, end) character span in it.

    The template is rendered with a unique placeholder per content, then the contents are put in
    their place: searching for the contents themselves would mistake a short reply such as "a"
    for the "a" of the header "assistant" before it (and mask the wrong tokens).
    """
    marks = [f"\u2063{i}\u2063" for i in range(len(messages))]
    skeleton = _skeleton(tokenizer, tuple(m["role"] for m in messages), cache)
    parts, located, cursor, length = [], [], 0, 0
    for i, (m, mark) in enumerate(zip(messages, marks, strict=True)):
        at = skeleton.find(mark, cursor)
        if at < 0:  # a template error: one conversation's reject, a system message's warning
            from jinja2.exceptions import TemplateError

            raise TemplateError(
                f"conversation {conv_id}: the chat template changed, dropped or moved message "
                f"{i}'s content (a {m['role']} message), so its tokens cannot be located; use a "
                "template that writes contents verbatim, in order"
            )
        length += at - cursor
        located.append((length, length + len(m["content"])))
        length += len(m["content"])
        parts += [skeleton[cursor:at], m["content"]]
        cursor = at + len(mark)
    return "".join([*parts, skeleton[cursor:]]), located


def _skeleton(tokenizer: Any, roles: tuple[str, ...], cache: dict | None) -> str:
    """The template rendered with placeholder contents. It depends only on the roles, so a
    caller rendering many conversations passes a cache and jinja runs once per role sequence."""
    if cache is not None and roles in cache:
        return cache[roles]
    probe = [{"role": r, "content": f"\u2063{i}\u2063"} for i, r in enumerate(roles)]
    skeleton = tokenizer.apply_chat_template(probe, tokenize=False)
    if cache is not None:
        cache[roles] = skeleton
    return skeleton


def template_system_prompt(tokenizer: Any) -> str | None:
    """The system prompt a chat template writes into a conversation that has none (Qwen2.5:
    "You are Qwen, created by Alibaba Cloud. ..."), or None. Found by rendering one user turn
    with a system message of our own and without one: what stands in its place is the default.
    Prepare makes it the conversation's own system message, so that every window repeats it as
    serving always sends it (left to the template, only a conversation's first window had it)."""
    from jinja2.exceptions import TemplateError

    user = {"role": "user", "content": "\u2063u\u2063"}
    mark = "\u2063s\u2063"
    try:
        own = tokenizer.apply_chat_template(
            [{"role": "system", "content": mark}, user], tokenize=False
        )
        none = tokenizer.apply_chat_template([user], tokenize=False)
    except TemplateError:  # a template without a system role
        return None
    head, found, tail = own.partition(mark)
    if not found or len(none) <= len(head) + len(tail):
        return None
    if not (none.startswith(head) and none.endswith(tail)):
        return None
    return none[len(head) : len(none) - len(tail)]


def control_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """The tokenizer's special tokens as one pattern. Written in a message's text, each would be
    encoded as that token: a forged turn header, or an end of reply in mid-text."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    if not specials:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def find_control_token(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The first special token written in `text` (prepare rejects it, serve answers a 400)."""
    found = pattern.search(text) if pattern is not None else None
    return found.group() if found else None


def check_control_tokens(conv: Conversation, pattern: re.Pattern[str] | None) -> None:
    for i, m in enumerate(conv.messages):
        found = find_control_token(m.content, pattern)
        if found:
            raise RecordError(
                "control_token",
                f"message {i} ({m.role}) holds {found!r}, a special token of the "
                "tokenizer: as text it would be encoded as that token (a forged turn, or an end "
                "of reply in mid-text); remove it from the corpus",
            )


def split_windows(r: Rendered, seq_len: int) -> tuple[list[Sequence], int]:
    """Cut a rendered conversation into sequences of at most seq_len tokens; returns them and
    the number of replies left untrained because they do not fit beside the message before.

    Each window is the system prefix plus a run of whole messages ending on an assistant turn.
    A window starts as early as its first new target allows and then extends forward; assistant
    turns already trained in an earlier window are context only (labels -100) in later ones.
    A reply is only trained with the message that prompted it (a target always has one: only
    replies after a user turn are targets): one that cannot fit beside it (either is too long)
    is not trained, and counted. No window is ever cut.
    """
    n = len(r.input_ids)
    if n <= seq_len:
        return [Sequence(r.input_ids, r.labels, len(r.targets))], 0
    starts = [max(s, r.prefix) for s in r.starts]  # message i spans [starts[i], bounds[i])
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
    without_prompt = 0
    while pending:
        target = pending[0]
        lo = target
        while lo > first and r.bounds[target] - starts[lo - 1] <= budget:
            lo -= 1
        if lo == target > first:  # the message before does not fit beside it
            pending.pop(0)
            without_prompt += 1
            continue
        hi = target
        for j in pending[1:]:
            if r.bounds[j] - starts[lo] > budget:
                break
            hi = j
        trained = [j for j in pending if j <= hi]
        pending = pending[len(trained) :]
        out.append(_window(r, starts, lo, hi, trained, seq_len))
    return out, without_prompt


def _window(
    r: Rendered, starts: list[int], lo: int, hi: int, trained: list[int], seq_len: int
) -> Sequence:
    ids = r.input_ids[: r.prefix] + r.input_ids[starts[lo] : r.bounds[hi]]
    labels = [IGNORE] * r.prefix
    trained_set = set(trained)
    for i in range(lo, hi + 1):  # message i and the line breaks after it, up to the next
        seg = slice(starts[i], starts[i + 1] if i < hi else r.bounds[hi])
        labels += r.labels[seg] if i in trained_set else [IGNORE] * (seg.stop - seg.start)
    assert len(ids) <= seq_len, (len(ids), seq_len)  # split_windows chose lo..hi to fit
    return Sequence(ids, labels, len(trained))
