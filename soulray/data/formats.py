"""Corpus formats: split a file into records, detect each record's shape, adapt it to a
Conversation.

Shapes (auto-detected per record, or forced with `data.format`):
- messages  OpenAI / SoulChatCorpus:
            {"id"?, "topic"|"normalizedTag"?, "messages": [{role, content}]}
- sharegpt  {"conversations": [{"from": human|gpt|system, "value"}]}
- smile     a list of turns [{"role": client|counselor, "content"}] (one SMILECHAT file)
- xtuner    XTuner / EmoLLM: {"conversation": [{"system"?, "input", "output"}]}
- esconv    {"dialog": [{"speaker": seeker|supporter|usr|sys|speaker|listener, "content"|"text",
            "annotation": {"strategy"?}}], "problem_type"?, "emotion_type"?}

Files: .jsonl (one record per line), .json (one record, a list of records, or one SMILE list;
JSON-lines content in a .json file is read line by line), .parquet (one record per row), .tsv
(ESConv's released `*WithStrategy_short.tsv`, read back into esconv records: esconv_tsv_records).
A record that cannot be read becomes a RawRecord with an error, never an exception.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from soulray.data.conversation import Conversation, Message, RecordError, Role
from soulray.text import SURROGATE

FORMATS = ("messages", "sharegpt", "smile", "xtuner", "esconv")
# ESConv's released TSVs by their name ({train,dev,test}WithStrategy_short.tsv), lower case:
# other .tsv files (labels, metadata) in an input folder are not corpus files
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", "withstrategy_short.tsv")


@dataclass(slots=True)
class RawRecord:
    location: str  # "path:line" for JSON lines, "path[index]" for arrays and Parquet rows
    key: str  # stable default id: "<file stem>:<line or index>"
    record: Any  # the parsed JSON value (None when it did not parse)
    # the record's source text, written to rejects.jsonl when it is rejected; None for an array
    # item (json.dumps(record), computed only for a rejected record: most are kept)
    raw: str | None
    error: RecordError | None = None

    def source_text(self) -> str:
        if self.raw is not None:
            return self.raw
        text = json.dumps(self.record, ensure_ascii=False)
        # half a UTF-16 pair (a broken emoji, which check_encodable rejects) has no UTF-8 form:
        # the rejects line keeps it escaped, as the file had it
        return json.dumps(self.record) if SURROGATE.search(text) else text


def split_records(path: str, data: bytes) -> Iterator[RawRecord]:
    """Yield every record of one file, in file order."""
    stem = PurePosixPath(path).stem
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path, stem, data)
        return
    data = data.removeprefix(b"\xef\xbb\xbf")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16's byte-order mark
        err = RecordError(
            "invalid_encoding",
            "the file is UTF-16, not UTF-8; convert it, e.g. "
            f"`iconv -f UTF-16 -t UTF-8 {PurePosixPath(path).name} > out{suffix}`",
        )
        yield RawRecord(path, stem, None, data[:2000].decode("utf-16", errors="replace"), err)
        return
    if suffix == ".tsv":
        yield from esconv_tsv_records(path, stem, data)
        return
    if suffix != ".json" and not opens_json_array(data):
        yield from line_records(path, stem, data)
        return
    try:
        text = data.decode("utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        text = data.decode("utf-8", errors="replace")
        # where the parser gave up: at the end of the file (or inside a string running to it)
        # the file was cut short, not broken in the middle
        at_end = isinstance(e, json.JSONDecodeError) and (
            e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())
        )
        turns = _is_turn_array(data, at_end)  # one SMILE conversation: its items are turns
        if not turns and (items := _array_items(path, stem, data, at_end)) is not None:
            yield from items  # an array with a bad record: the others are read
        elif looks_like_json_lines(text):
            yield from line_records(path, stem, data)
        elif isinstance(e, UnicodeDecodeError):
            yield RawRecord(path, stem, None, text[:2000], not_utf8(e))
        elif not text.strip():
            yield RawRecord(path, stem, None, "", RecordError("invalid_json", "the file is empty"))
        else:
            where = f"line {e.lineno} col {e.colno}: {e.msg}"
            if turns:
                where += (
                    "; the file is one SMILE conversation (a list of turns) and was skipped: "
                    + (
                        "it was cut short, e.g. by an interrupted download or copy; fetch it again"
                        if at_end
                        else "fix it there and run again"
                    )
                )
            elif e.msg == "Extra data":  # two arrays one after the other (files joined with cat)
                where += (
                    "; the whole file was skipped: it holds more than one JSON value; merge "
                    "them into one array, or write one record per line in a .jsonl file"
                )
            elif text.lstrip("\ufeff \t\r\n").startswith("["):  # an array that does not balance
                where += (
                    "; the whole file was skipped: its brackets or quotes do not balance, so its "
                    "records cannot be told apart (fix it there and run again)"
                )
            yield RawRecord(path, stem, None, text[:2000], RecordError("invalid_json", where))
        return
    yield from _json_value_records(path, stem, value)


def not_utf8(e: UnicodeDecodeError) -> RecordError:
    return RecordError(
        "invalid_encoding",
        f"not UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start}); convert the file to "
        "UTF-8 from its encoding, e.g. `iconv -f GBK -t UTF-8 in.jsonl > out.jsonl` (GBK or "
        "GB18030 for Chinese, CP1252 or LATIN1 for Western text)",
    )


def parse_item(loc: str, key: str, data: bytes) -> RawRecord:
    """One JSON record of its own bytes: decoded strictly (a GBK line is a reject, not text
    with replacement characters that would train) and parsed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors="replace").strip()
        return RawRecord(loc, key, None, text, not_utf8(e))
    try:
        return RawRecord(loc, key, json.loads(text), None)
    except json.JSONDecodeError as e:
        return RawRecord(loc, key, None, text.strip(), RecordError("invalid_json", e.msg))


def _array_items(path: str, stem: str, data: bytes, cut_short: bool) -> list[RawRecord] | None:
    """The items of a JSON array that does not parse as a whole, each parsed alone (located
    as the big-file reader locates them: path[i]); None when it is not one array."""
    from soulray.data.ranges import array_item_spans, truncated_array_spans

    spans = array_item_spans(data)
    if spans:
        return [
            parse_item(f"{path}[{i}]", f"{stem}:{i}", data[start:end])
            for i, (start, end) in enumerate(spans)
        ]
    cut = truncated_array_spans(data) if spans is None and cut_short else None
    if cut is None:
        return None
    complete, tail = cut
    items = [
        parse_item(f"{path}[{i}]", f"{stem}:{i}", data[start:end])
        for i, (start, end) in enumerate(complete)
    ]
    i, rest = len(complete), data[tail:].strip()
    last = parse_item(f"{path}[{i}]", f"{stem}:{i}", rest) if rest else None
    if last is not None and last.error is None:
        return [*items, last]  # only the closing bracket is missing
    where = "inside this record" if rest else f"after record {i - 1} without closing the array"
    err = RecordError(
        "invalid_json",
        f"the file ends {where} (byte {len(data)}): it was cut short, e.g. by an interrupted "
        f"download or copy; the {i} record(s) before are read. Fetch the whole file again, or "
        "end the array after the last complete record",
    )
    text = rest.decode("utf-8", errors="replace")[:2000]
    return [*items, RawRecord(f"{path}[{i}]", f"{stem}:{i}", None, text, err)]


def _is_turn_array(data: bytes, cut_short: bool) -> bool:
    """Whether a JSON array that does not parse holds SMILE turns (its first item that parses
    is one): the file is one conversation, so it is one reject, never one record per turn."""
    from soulray.data.ranges import array_item_spans, truncated_array_spans

    spans = array_item_spans(data)
    if spans is None and cut_short:
        cut = truncated_array_spans(data)
        spans = cut[0] if cut else None
    for start, end in spans or []:
        try:
            item = json.loads(data[start:end].decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            continue
        return is_turn_list([item])
    return False


def opens_json_array(data: bytes) -> bool:
    """A .jsonl file that holds one pretty-printed JSON array (`json.dump(items, f, indent=2)`:
    its first line is a lone "["), read as the .json it is: as lines, each would be a reject.
    A JSON-lines record that is a list (a SMILE conversation) opens its line with "[{"."""
    head = data[:4096].removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    return head.split(b"\n", 1)[0].strip() == b"["


def looks_like_json_lines(text: str) -> bool:
    """A record per line: one of the first few lines that start at column 0 is a whole JSON
    record (so a bad first line costs that line, not the file). Pretty-printed JSON, whose
    first line is a lone bracket and whose records are indented, is not."""
    lines = [ln for ln in text.split("\n")[:50] if ln.strip()][:5]
    if not lines or lines[0].strip() in ("[", "{"):
        return False
    for line in lines:
        if line[:1].isspace():
            continue
        try:
            if isinstance(json.loads(line), dict | list):
                return True
        except json.JSONDecodeError:
            continue
    return False


# One utterance of an ESConv TSV line: `<loss weight> <speaker 0=seeker|1=supporter> <index>
# [Strategy] text` (the tag on supporter turns)
TSV_UTTERANCE = re.compile(r"(\d+(?:\.\d+)?) ([01]) (\d+)(?: (.*))?", re.DOTALL)
TSV_STRATEGY = re.compile(r"\[([^\]]+)\]\s*(.*)", re.DOTALL)
TSV_SHAPE = (
    "an ESConv TSV line is utterances joined by ' EOS ', each `<weight> <speaker 0|1> <index> "
    "[Strategy] text`"
)


def esconv_tsv_records(path: str, stem: str, data: bytes) -> Iterator[RawRecord]:
    """ESConv's `*WithStrategy_short.tsv`: one training example per line, the dialogue so far
    (a window of its last turns) ending in the reply to learn. Read back into dialogues, one
    esconv record each (located `path:first-last line`): consecutive lines are one dialogue
    while the turns they share agree, or while the window only moves on (it skips turns at
    times: the dialogue then lacks them). Each line alone would train every reply many times,
    and put a dialogue's prefixes on both sides of the train/val split."""
    turns: dict[int, tuple[str, str]] = {}  # index -> (speaker, text with its tag)
    lines: list[str] = []
    first = last = 0  # the dialogue's first and last line numbers

    def dialogue() -> RawRecord:
        dialog = []
        for _, (speaker, text) in sorted(turns.items()):
            tagged = TSV_STRATEGY.fullmatch(text) if speaker == "1" else None
            turn: dict[str, Any] = {"speaker": "supporter" if speaker == "1" else "seeker"}
            turn["content"] = tagged.group(2) if tagged else text
            if tagged:
                turn["annotation"] = {"strategy": tagged.group(1)}
            dialog.append(turn)
        where = f"{path}:{first}" + (f"-{last}" if last > first else "")
        return RawRecord(where, f"{stem}:{first}", {"dialog": dialog}, "\n".join(lines))

    held: list[RawRecord] = []  # a bad line's reject, yielded after the dialogue around it

    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", errors="replace").removesuffix("\r")
            held.append(RawRecord(f"{path}:{lineno}", f"{stem}:{lineno}", None, text, not_utf8(e)))
            continue
        if not line.strip():
            continue
        parts = [TSV_UTTERANCE.fullmatch(u.strip()) for u in line.split(" EOS ")]
        if not all(parts):
            bad = next(i for i, m in enumerate(parts) if m is None)
            err = RecordError("invalid_record", f"utterance {bad} does not parse: {TSV_SHAPE}")
            held.append(RawRecord(f"{path}:{lineno}", f"{stem}:{lineno}", None, line, err))
            continue
        said = {int(m.group(3)): (m.group(2), (m.group(4) or "").strip()) for m in parts if m}
        shared = [i for i in said if i in turns]
        same = (
            all(turns[i] == said[i] for i in shared)
            if shared
            else min(said) > max(turns, default=-1)
        )
        if turns and not same:
            yield dialogue()
            turns, lines = {}, []
        if not lines:  # in file order: the rejects of lines before this dialogue first
            yield from held
            held, first = [], lineno
        turns |= said
        lines.append(line)
        last = lineno
    if turns:
        yield dialogue()
    yield from held


def line_records(path: str, stem: str, data: bytes, first: int = 1) -> Iterator[RawRecord]:
    """The records of JSON lines bytes whose first line is line number `first` (a whole file,
    or a byte range of one: ranges.py), located as `path:line`. A line that is not UTF-8 is
    an invalid_encoding reject (the others are read)."""
    lines: list[str | bytes]
    try:
        lines = [*data.decode("utf-8").split("\n")]
    except UnicodeDecodeError:
        lines = [*data.split(b"\n")]  # decoded one by one below
    # split at "\n" only: str.splitlines also splits at U+2028/U+2029, which
    # json.dumps(ensure_ascii=False) leaves raw inside strings, cutting such a record in two
    for lineno, raw in enumerate(lines, start=first):
        loc, key = f"{path}:{lineno}", f"{stem}:{lineno}"
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8").removesuffix("\r")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", errors="replace").removesuffix("\r")
                yield RawRecord(loc, key, None, text, not_utf8(e))
                continue
        else:
            line = raw.removesuffix("\r")
        # a byte-order mark opening a line: files joined with `cat` keep each one's BOM
        line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            yield RawRecord(loc, key, json.loads(line), line)
        except json.JSONDecodeError as e:
            yield RawRecord(loc, key, None, line, RecordError("invalid_json", e.msg))


def _json_value_records(path: str, stem: str, value: Any) -> Iterator[RawRecord]:
    if isinstance(value, list) and not is_turn_list(value):
        for i, item in enumerate(value):
            yield RawRecord(f"{path}[{i}]", f"{stem}:{i}", item, None)
    else:  # one record: a dict, or one SMILE conversation given as a list of turns
        yield RawRecord(path, stem, value, json.dumps(value, ensure_ascii=False))


def _parquet_records(path: str, stem: str, data: bytes) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        yield RawRecord(path, stem, None, "", RecordError("invalid_json", f"bad Parquet: {e}"))
        return
    yield from parquet_rows(path, stem, rows)


def parquet_rows(path: str, stem: str, rows: list[Any], first: int = 0) -> Iterator[RawRecord]:
    """Parquet rows as records, the first being row number `first` of the file."""
    for i, row in enumerate(rows, start=first):
        raw = json.dumps(row, ensure_ascii=False, default=str)
        yield RawRecord(f"{path}[{i}]", f"{stem}:{i}", row, raw)


def is_turn_list(value: Any) -> bool:
    """A SMILE conversation: a non-empty list of dicts with a role and no nested dialogue. Any
    turn's role counts, not only the first's: a file whose first turn lost its role is one
    conversation with a defect (one reject naming the turn), not a list of unknown records."""
    dialogue_keys = {"messages", "conversations", "conversation", "dialog"}
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, dict) for t in value)
        and any("role" in t for t in value)
        and not any(dialogue_keys & t.keys() for t in value)
    )


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        for key, fmt in (
            ("messages", "messages"),
            ("conversations", "sharegpt"),
            ("conversation", "xtuner"),
            ("dialog", "esconv"),
        ):
            if key in record:
                return fmt
    elif is_turn_list(record):
        return "smile"
    shape = sorted(record)[:6] if isinstance(record, dict) else type(record).__name__
    hint = ""
    if isinstance(record, list) and record and all(isinstance(r, dict) for r in record):
        hint = " (a JSON array of records on one line? name the file .json to read them)"
    raise RecordError(
        "unknown_format",
        f"matches no known corpus shape (keys/type: {shape}); expected one of "
        f"{', '.join(FORMATS)}{hint}",
    )


def to_conversation(record: Any, fmt: str, key: str) -> Conversation:
    """Adapt one parsed record; raise RecordError naming the defect."""
    adapter: Callable[[Any, str], Conversation]
    match fmt:
        case "messages":
            adapter = _from_messages
        case "sharegpt":
            adapter = _from_sharegpt
        case "smile":
            adapter = _from_smile
        case "xtuner":
            adapter = _from_xtuner
        case "esconv":
            adapter = _from_esconv
        case _:
            raise ValueError(f"unknown format {fmt!r}")
    return adapter(record, key)


def forced_format_error(record: Any, fmt: str, e: RecordError) -> RecordError:
    """A record that data.format={fmt} could not read, with the shape it has, when that is
    another known one ('conversations' missing in a `messages` record says too little)."""
    try:
        found = detect_format(record)
    except RecordError:
        return e
    if found == fmt:
        return e
    return RecordError(
        e.reason,
        f"{e.detail} (data.format={fmt} forces that shape, and this record is {found}-shaped: "
        "set data.format=auto or to the corpus' format)",
    )


def _expect(cond: bool, detail: str) -> None:
    if not cond:
        raise RecordError("invalid_record", detail)


def _text(value: Any, where: str) -> str:
    _expect(isinstance(value, str), f"{where} must be a string, got {type(value).__name__}")
    return value


def _turns(record: Any, field: str) -> list[Any]:
    _expect(isinstance(record, dict), f"record must be an object, got {type(record).__name__}")
    turns = record.get(field)
    _expect(isinstance(turns, list), f"'{field}' must be a list, got {type(turns).__name__}")
    for i, t in enumerate(turns):
        _expect(isinstance(t, dict), f"{field}[{i}] must be an object, got {type(t).__name__}")
    return turns


def _role(raw: Any, table: dict[str, Role], where: str) -> Role:
    role = table.get(raw.lower()) if isinstance(raw, str) else None
    _expect(role is not None, f"{where} is {raw!r}; expected one of {sorted(table)}")
    assert role is not None
    return role


def _record_id(record: dict[str, Any], key: str) -> str:
    rid = record.get("id")
    return key if rid is None or isinstance(rid, dict | list) else str(rid)


MESSAGE_ROLES: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
}
SMILE_ROLES: dict[str, Role] = {"client": "user", "counselor": "assistant"}
ESCONV_ROLES: dict[str, Role] = {
    "seeker": "user",
    "usr": "user",
    "speaker": "user",
    "supporter": "assistant",
    "sys": "assistant",
    "listener": "assistant",
}


def _from_messages(record: Any, key: str) -> Conversation:
    turns = _turns(record, "messages")
    messages = [
        Message(
            _role(t.get("role"), MESSAGE_ROLES, f"messages[{i}].role"),
            _text(t.get("content"), f"messages[{i}].content"),
            _optional_text(t.get("strategy"), f"messages[{i}].strategy"),
        )
        for i, t in enumerate(turns)
    ]
    topic = record.get("topic") or record.get("normalizedTag")
    return Conversation(_record_id(record, key), "messages", _topic(topic), messages)


def _from_sharegpt(record: Any, key: str) -> Conversation:
    turns = _turns(record, "conversations")
    messages = [
        Message(
            _role(t.get("from"), SHAREGPT_ROLES, f"conversations[{i}].from"),
            _text(t.get("value"), f"conversations[{i}].value"),
            _optional_text(t.get("strategy"), f"conversations[{i}].strategy"),
        )
        for i, t in enumerate(turns)
    ]
    if isinstance(record.get("system"), str):
        messages.insert(0, Message("system", record["system"]))
    topic = record.get("topic") or record.get("category")
    return Conversation(_record_id(record, key), "sharegpt", _topic(topic), messages)


def _from_smile(record: Any, key: str) -> Conversation:
    _expect(isinstance(record, list), "a SMILE conversation must be a list of turns")
    messages = []
    for i, t in enumerate(record):
        _expect(isinstance(t, dict), f"turn {i} must be an object, got {type(t).__name__}")
        role = _role(t.get("role"), SMILE_ROLES, f"turn {i} role")
        messages.append(Message(role, _text(t.get("content"), f"turn {i} content")))
    return Conversation(key, "smile", None, messages)


def _from_xtuner(record: Any, key: str) -> Conversation:
    turns = _turns(record, "conversation")
    messages: list[Message] = []
    for i, t in enumerate(turns):
        if t.get("system") is not None:
            messages.append(Message("system", _text(t["system"], f"conversation[{i}].system")))
        messages.append(Message("user", _text(t.get("input"), f"conversation[{i}].input")))
        messages.append(Message("assistant", _text(t.get("output"), f"conversation[{i}].output")))
    return Conversation(_record_id(record, key), "xtuner", _topic(record.get("topic")), messages)


def _from_esconv(record: Any, key: str) -> Conversation:
    turns = _turns(record, "dialog")
    messages = []
    for i, t in enumerate(turns):
        role = _role(t.get("speaker"), ESCONV_ROLES, f"dialog[{i}].speaker")
        content = _text(t.get("content", t.get("text")), f"dialog[{i}].content")
        annotation = t.get("annotation") or {}
        _expect(isinstance(annotation, dict), f"dialog[{i}].annotation must be an object")
        strategy = _optional_text(annotation.get("strategy"), f"dialog[{i}].annotation.strategy")
        messages.append(Message(role, content, strategy))
    topic = record.get("problem_type") or record.get("emotion_type")
    return Conversation(_record_id(record, key), "esconv", _topic(topic), messages)


def _optional_text(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _topic(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None
