"""Format adapters on the real corpora in ../shared/data, with exact counts of every defect.

Every expected number below was derived independently of soulray: raw_recount.py reads the raw
JSON with plain `json` and applies the cleaning rules by hand (strip, drop empty turns, merge
consecutive turns of one role keeping the first strategy, reject conversations with no assistant
turn after the first user turn, dedupe by roles + contents), and
test_the_adapters_agree_with_the_raw_recount compares it with soulray on every corpus.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raw_recount import recount
from soulray_testing import shared_path

from soulray.config import StrategyConfig
from soulray.data.conversation import (
    Conversation,
    RecordError,
    build_strategy_lookup,
    clean_conversation,
    count_target_turns,
)
from soulray.data.formats import detect_format, split_records, to_conversation

STRATEGIES = StrategyConfig()
LOOKUP = build_strategy_lookup(STRATEGIES)


@dataclass
class Adapted:
    formats: Counter = field(default_factory=Counter)
    records: int = 0
    raw_turns: int = 0
    kept: list[Conversation] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    merged: int = 0
    empty: int = 0
    unknown: Counter = field(default_factory=Counter)

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.rejected))

    @property
    def turns(self) -> int:
        return sum(len(c.messages) for c in self.kept)

    @property
    def targets(self) -> int:
        return sum(count_target_turns(c.messages) for c in self.kept)


def adapt(paths: list[Path], fmt: str = "auto") -> Adapted:
    """Read, adapt, clean and dedupe files exactly as the pipeline does, on one process."""
    out, seen = Adapted(), set()
    for path in paths:
        for raw in split_records(str(path), path.read_bytes()):
            out.records += 1
            try:
                if raw.error:
                    raise raw.error
                kind = detect_format(raw.record) if fmt == "auto" else fmt
                out.formats[kind] += 1
                conv = to_conversation(raw.record, kind, raw.key)
                out.raw_turns += len(conv.messages)
                conv, stats = clean_conversation(conv, LOOKUP, STRATEGIES.fallback)
            except RecordError as e:
                out.rejected.append((raw.location, e.reason))
                continue
            if conv.content_hash() in seen:
                out.rejected.append((raw.location, "duplicate"))
                continue
            seen.add(conv.content_hash())
            out.kept.append(conv)
            out.merged += stats.merged_turns
            out.empty += stats.empty_turns
            out.unknown.update(stats.unknown_strategies)
    return out


CORPORA = {  # name: (files, the raw format)
    "soulchat": (
        ["soulchat/soulchatcorpus_card_example.json", "soulchat/psydtcorpus_readme_example.json"],
        "messages",
    ),
    "smile": (["smile/dialogs"], "smile"),
    "emollm": (["emollm/data.json"], "xtuner"),
    "esconv": (["esconv/FailedESConv.json"], "esconv"),
}


@pytest.mark.parametrize("name", list(CORPORA))
def test_the_adapters_agree_with_the_raw_recount(name):
    names, kind = CORPORA[name]
    paths = [p for n in names for p in sorted_files(shared_path(n))]
    records = []
    for path in paths:
        data = json.loads(path.read_text("utf-8"))
        records += data if kind in ("xtuner", "esconv") else [data]
    a = adapt(paths)
    replies = [m for c in a.kept for m in c.messages if m.role == "assistant"]
    counted = Counter(
        records=a.records,
        raw_turns=a.raw_turns,
        kept=len(a.kept),
        turns=a.turns,
        merged=a.merged,
        empty=a.empty,
        targets=a.targets,
        assistant=len(replies),
        assistant_first=sum(c.messages[0].role == "assistant" for c in a.kept),
        rejected=a.reasons.get("no_assistant_turn", 0),
        duplicate=a.reasons.get("duplicate", 0),
    )
    counted.update(f"label.{m.strategy}" for m in replies if m.strategy and kind == "esconv")
    expected = recount(records, kind)
    for key in [k for k in expected if k.startswith(("strategy", "strategies_"))]:
        del expected[key]  # what the prepare job reports (test_prepare_ray.py compares them)
    assert +counted == expected


def sorted_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.json")) if path.is_dir() else [path]


def test_soulchat_messages_records():
    card = shared_path("soulchat/soulchatcorpus_card_example.json")
    psydt = shared_path("soulchat/psydtcorpus_readme_example.json")
    a = adapt([card, psydt])
    # raw JSON: card 12 messages (6 user/6 assistant); PsyDT 31 (1 system, 15 user, 15 assistant)
    assert a.formats == {"messages": 2}
    assert (a.records, a.raw_turns, a.turns, a.targets) == (2, 43, 43, 21)
    assert (a.merged, a.empty, a.rejected, a.unknown) == (0, 0, [], {})
    card_conv, psydt_conv = a.kept
    assert (card_conv.id, card_conv.topic, card_conv.source) == ("0", "成长", "messages")
    assert psydt_conv.topic == "婚恋"  # from "normalizedTag"
    assert [m.role for m in psydt_conv.messages[:3]] == ["system", "user", "assistant"]
    raw = json.loads(card.read_text(encoding="utf-8"))
    assert [m.content for m in card_conv.messages] == [m["content"] for m in raw["messages"]]


def test_smile_dialogs_directory():
    files = sorted(shared_path("smile/dialogs").glob("*.json"))
    a = adapt(files)
    # raw JSON: 254 files, 2,920 turns; 74.json has only client turns; consecutive counselor
    # turns: 4 pairs in 82.json, 1 in 157.json; no empty turn; 1,437 counselor turns after a client
    assert (len(files), a.formats) == (254, {"smile": 254})
    assert (a.records, a.raw_turns) == (254, 2920)
    assert len(a.kept) == 253
    assert a.rejected == [(str(shared_path("smile/dialogs/74.json")), "no_assistant_turn")]
    assert (a.merged, a.empty, a.turns, a.targets) == (5, 0, 2914, 1437)


def test_smile_merges_consecutive_counselor_turns():
    path = shared_path("smile/dialogs/82.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    (conv,) = adapt([path]).kept
    # raw roles: turns 5, 6, 7 are counselor, counselor, counselor -> one message joined by "\n"
    assert [t["role"] for t in raw[5:8]] == ["counselor"] * 3
    assert conv.messages[5].role == "assistant"
    assert conv.messages[5].content == "\n".join(t["content"].strip() for t in raw[5:8])
    assert (conv.id, conv.source, len(conv.messages)) == ("82", "smile", 16)
    roles = [m.role for m in conv.messages]
    assert all(a != b for a, b in pairwise(roles))


def test_a_smile_file_whose_first_turn_lost_its_role_is_one_reject(tmp_path):
    """Its 10 turns were 10 unknown_format 'records' (only the first turn's role was looked at)."""
    turns = json.loads(shared_path("smile/dialogs/0.json").read_text(encoding="utf-8"))
    del turns[0]["role"]
    path = tmp_path / "0.json"
    path.write_text(json.dumps(turns, ensure_ascii=False), encoding="utf-8")
    a = adapt([path])
    assert (a.records, a.rejected) == (1, [(str(path), "invalid_record")])
    with pytest.raises(RecordError) as info:
        to_conversation(turns, detect_format(turns), "0")
    assert info.value.detail == "turn 0 role is None; expected one of ['client', 'counselor']"


def test_emollm_xtuner():
    a = adapt([shared_path("emollm/data.json")])
    # raw JSON: 1,596 conversations, 5,072 input/output pairs, a system prompt on 1,596 of them
    assert a.formats == {"xtuner": 1596}
    assert (a.records, len(a.kept), a.rejected) == (1596, 1596, [])
    assert (a.raw_turns, a.turns, a.targets) == (11740, 11740, 5072)
    assert (a.merged, a.empty, a.unknown) == (0, 0, {})
    assert all(c.messages[0].role == "system" for c in a.kept)
    assert a.kept[0].id == "data:0"  # no id in the record: "<file stem>:<index>"


def test_failed_esconv_speaker_listener():
    a = adapt([shared_path("esconv/FailedESConv.json")])
    # raw JSON: 196 dialogues, 5,230 utterances; merging consecutive same-speaker utterances
    # leaves 3,968 (1,262 merges); 71 dialogues open with a listener greeting, so 1,979 listener
    # messages of which 1,908 follow a speaker turn; "Direct Guidance" x11 is the only raw name
    # outside the taxonomy + aliases
    assert a.formats == {"esconv": 196}
    assert (a.records, len(a.kept), a.rejected) == (196, 196, [])
    assert (a.raw_turns, a.turns, a.merged, a.empty) == (5230, 3968, 1262, 0)
    assert a.targets == 1908
    assert sum(m.role == "assistant" for c in a.kept for m in c.messages) == 1979
    assert sum(c.messages[0].role == "assistant" for c in a.kept) == 71
    assert a.unknown == {"Direct Guidance": 11}
    assert a.kept[0].topic == "ongoing depression"  # problem_type


def test_failed_esconv_strategy_spellings_normalised():
    a = adapt([shared_path("esconv/FailedESConv.json")])
    strategies = Counter(m.strategy for c in a.kept for m in c.messages if m.role == "assistant")
    # raw JSON, first label of each merged listener run, mapped by hand: Questions -> Question,
    # Other/Direct Guidance -> Others, Approval and Reassurance -> Affirmation and Reassurance,
    # Restatement -> Restatement or Paraphrasing
    assert strategies == {
        "Question": 422,
        "Others": 350,
        "Providing Suggestions": 321,
        "Affirmation and Reassurance": 288,
        "Reflection of feelings": 170,
        "Self-disclosure": 164,
        "Restatement or Paraphrasing": 152,
        "Information": 112,
    }
    assert all(m.strategy is None for c in a.kept for m in c.messages if m.role == "user")


SHAREGPT = [
    {
        "id": "sg-1",
        "system": "You are a patient listener.",
        "category": "family",
        "conversations": [
            {"from": "human", "value": "My brother stopped talking to me."},
            {
                "from": "gpt",
                "value": "That silence must hurt.",
                "strategy": "[reflection of feelings]",
            },
            {"from": "human", "value": "   "},
            {"from": "human", "value": "It has been a month."},
            {"from": "human", "value": "I miss him."},
            {
                "from": "gpt",
                "value": "What happened before he went quiet?",
                "strategy": "Questions",
            },
        ],
    },
    {
        "conversations": [
            {"from": "gpt", "value": "Hi, I'm here to listen."},
            {"from": "user", "value": "I can't focus at work."},
            {"from": "assistant", "value": "Since when?", "strategy": "Probing"},
        ]
    },
    {"conversations": [{"from": "robot", "value": "beep"}]},
    {"conversations": [{"from": "human", "value": "Hello?"}]},
    {"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": 7}]},
]


def test_sharegpt_hand_written(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(SHAREGPT), encoding="utf-8")
    a = adapt([path])
    assert a.formats == {"sharegpt": 5}
    assert a.rejected == [
        (f"{path}[2]", "invalid_record"),  # unknown speaker "robot"
        (f"{path}[3]", "no_assistant_turn"),
        (f"{path}[4]", "invalid_record"),  # value is a number
    ]
    first, second = a.kept
    assert (first.id, first.topic, second.id) == ("sg-1", "family", "chats:1")
    assert [(m.role, m.content, m.strategy) for m in first.messages] == [
        ("system", "You are a patient listener.", None),
        ("user", "My brother stopped talking to me.", None),
        ("assistant", "That silence must hurt.", "Reflection of feelings"),
        ("user", "It has been a month.\nI miss him.", None),
        ("assistant", "What happened before he went quiet?", "Question"),
    ]
    assert (a.empty, a.merged, a.unknown) == (1, 1, {"Probing": 1})
    assert second.messages[2].strategy == "Others"  # the fallback for an unknown name
    assert (count_target_turns(first.messages), count_target_turns(second.messages)) == (2, 1)


def test_forced_format_rejects_other_shapes(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(SHAREGPT[0]) + "\n" + json.dumps({"messages": []}) + "\n")
    a = adapt([path], fmt="sharegpt")
    assert a.rejected == [(f"{path}:2", "invalid_record")]  # no "conversations" list
    assert len(a.kept) == 1


def test_split_records_file_shapes(tmp_path):
    rec = {"messages": [{"role": "user", "content": "a"}]}
    lines = tmp_path / "lines.jsonl"
    lines.write_text(f"{json.dumps(rec)}\n\n{{broken\n{json.dumps(rec)}\n")
    got = [
        (r.location, r.key, r.error and r.error.reason)
        for r in split_records(str(lines), lines.read_bytes())
    ]
    assert got == [
        (f"{lines}:1", "lines:1", None),
        (f"{lines}:3", "lines:3", "invalid_json"),
        (f"{lines}:4", "lines:4", None),
    ]
    as_json = tmp_path / "lines_in.json"  # JSON lines inside a .json file, with a BOM
    as_json.write_bytes(b"\xef\xbb\xbf" + lines.read_bytes())
    assert [r.location for r in split_records(str(as_json), as_json.read_bytes())] == [
        f"{as_json}:1",
        f"{as_json}:3",
        f"{as_json}:4",
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('{"messages": [')
    (only,) = split_records(str(broken), broken.read_bytes())
    assert (only.location, only.error.reason) == (str(broken), "invalid_json")


def test_text_that_is_not_utf8_is_rejected_per_record(tmp_path):
    """A GBK line used to be read with replacement characters and trained on; now it is an
    invalid_encoding reject that says how to convert, and the UTF-8 records around it read."""
    good = json.dumps({"messages": [{"role": "user", "content": "睡不着"}]}, ensure_ascii=False)
    gbk = good.replace("睡不着", "最近压力好大").encode("gbk")
    lines = tmp_path / "mixed.jsonl"
    lines.write_bytes(good.encode() + b"\n" + gbk + b"\n" + good.encode() + b"\n")
    array = tmp_path / "mixed.json"
    array.write_bytes(b"[" + good.encode() + b"," + gbk + b"]")
    for path, where in ((lines, [":1", ":2", ":3"]), (array, ["[0]", "[1]"])):
        got = list(split_records(str(path), path.read_bytes()))
        assert [r.location for r in got] == [f"{path}{w}" for w in where]
        assert [r.error and r.error.reason for r in got] == [
            None if w in (":1", ":3", "[0]") else "invalid_encoding" for w in where
        ]
        bad = next(r for r in got if r.error)
        at = next(i for i, b in enumerate(gbk) if b >= 0x80)  # the first Chinese character
        assert bad.error.detail.startswith(f"not UTF-8 (byte 0x{gbk[at]:02x} at byte {at})")
        assert "iconv -f GBK -t UTF-8" in bad.error.detail


def test_utf16_files_and_arrays_in_jsonl_files_say_what_to_do(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    }
    utf16 = tmp_path / "export.jsonl"
    utf16.write_bytes(json.dumps(record).encode("utf-16"))  # with its byte-order mark
    (got,) = split_records(str(utf16), utf16.read_bytes())
    assert (got.error.reason, got.error.detail) == (
        "invalid_encoding",
        "the file is UTF-16, not UTF-8; convert it, e.g. "
        "`iconv -f UTF-16 -t UTF-8 export.jsonl > out.jsonl`",
    )
    with pytest.raises(RecordError, match=r"one line\? name the file .json to read them"):
        detect_format([record, record])  # a JSON array saved as .jsonl: one line, a list


def test_split_records_parquet(tmp_path):
    rows = [
        {
            "id": "p1",
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        },
        {"id": "p2", "messages": [{"role": "user", "content": "z"}]},
    ]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    a = adapt([path])
    assert [c.id for c in a.kept] == ["p1"]
    assert a.rejected == [(f"{path}[1]", "no_assistant_turn")]
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    (only,) = split_records(str(corrupt), corrupt.read_bytes())
    assert only.error.reason == "invalid_json"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"conversation": []}, "xtuner"),
        ({"dialog": []}, "esconv"),
        ([{"role": "client", "content": "x"}], "smile"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


@pytest.mark.parametrize("record", [{"text": "hi"}, 42, [], [1, 2], "just text"])
def test_detect_format_unknown(record):
    with pytest.raises(RecordError) as info:
        detect_format(record)
    assert info.value.reason == "unknown_format"


def test_a_truncated_array_keeps_its_complete_records(tmp_path):
    """An interrupted download: the records before the cut are read, the cut one is one
    reject that says so (it cost the whole file before)."""
    records = [
        {"id": i, "messages": [{"role": "user", "content": f'q{i} "quoted" [x]'}]} for i in range(3)
    ]
    for indent in (None, 2):
        whole = json.dumps(records, indent=indent)
        for cut_in in ('"q2', 'q2 \\"quo'):  # after a key, inside a string with escapes
            data = whole[: whole.index(cut_in) + len(cut_in)].encode()
            path = tmp_path / "cut.json"
            got = list(split_records(str(path), data))
            assert [r.location for r in got] == [f"{path}[{i}]" for i in range(3)]
            assert [r.record for r in got[:2]] == records[:2]
            assert got[2].error.reason == "invalid_json"
            assert got[2].error.detail.startswith(
                f"the file ends inside this record (byte {len(data)}): it was cut short"
            )


def test_only_an_array_cut_at_the_end_is_read_as_cut_short(tmp_path):
    records = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    whole = json.dumps(records, indent=2)
    path = str(tmp_path / "a.json")
    after_comma = whole[: whole.index('{\n    "id": 2')].rstrip().encode()  # ends in ","
    got = list(split_records(path, after_comma))
    assert [r.record for r in got[:2]] == records[:2]
    assert got[2].error.detail.startswith("the file ends after record 1 without closing")
    unclosed = whole.rstrip().removesuffix("]").encode()  # only the bracket is missing
    assert [r.record for r in split_records(path, unclosed)] == records
    broken = whole.replace('"q1"\n      }', '"q1"\n      ', 1).encode()  # a "}" lost mid-file
    (one,) = split_records(path, broken)
    assert one.error.reason == "invalid_json" and not one.error.detail.startswith("the file ends")
    trailing = b'{\n  "messages": [\n    {"role": "user", "content": "hi"}\n  ],\n}\n'
    (one,) = split_records(path, trailing)  # pretty JSON with an error: not JSON lines
    assert one.error.detail.startswith("line 5 col 1: Expecting property name")


def test_a_smile_file_that_does_not_parse_is_one_reject(tmp_path):
    """One conversation cut short or broken mid-file was read as its turns: 4 unknown_format
    'records' and an invalid_json one that said the records before it were read."""
    turns = json.loads(shared_path("smile/dialogs/0.json").read_text(encoding="utf-8"))
    whole = json.dumps(turns, ensure_ascii=False, indent=2).encode()
    path = str(tmp_path / "0.json")
    cut = whole[: len(whole) // 2]
    (one,) = split_records(path, cut)
    assert (one.location, one.error.reason, one.error.detail) == (
        path,
        "invalid_json",
        "line 91 col 21: Unterminated string starting at; the file is one SMILE conversation "
        "(a list of turns) and was skipped: it was cut short, e.g. by an interrupted download "
        "or copy; fetch it again",
    )
    no_comma = whole.replace(b"},\n  {", b"}\n  {", 1)
    (one,) = split_records(path, no_comma)
    assert one.error.detail == (
        "line 12 col 3: Expecting ',' delimiter; the file is one SMILE conversation (a list of "
        "turns) and was skipped: fix it there and run again"
    )
    (one,) = split_records(path, json.dumps(turns, ensure_ascii=False).encode("gbk"))
    assert one.error.reason == "invalid_encoding"


def test_a_json_file_of_json_lines_with_a_bad_first_line_keeps_the_others(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    data = ('{"messages": [broken\n' + json.dumps(good) + "\n" + json.dumps(good) + "\n").encode()
    got = list(split_records(str(tmp_path / "lines.json"), data))
    assert [(r.location.rsplit(":", 1)[1], r.error and r.error.reason) for r in got[:3]] == [
        ("1", "invalid_json"),
        ("2", None),
        ("3", None),
    ]


def test_files_joined_with_cat_keep_every_line_and_an_empty_file_says_so(tmp_path):
    """`cat a.jsonl b.jsonl` keeps b's byte-order mark at the start of a line: that line is
    read, not rejected as 'Unexpected UTF-8 BOM'. A file of whitespace names itself empty."""
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    joined = tmp_path / "cat.jsonl"
    joined.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n\xef\xbb\xbf" + line.encode() + b"\n")
    records = list(split_records(str(joined), joined.read_bytes()))
    assert [(r.location, r.error) for r in records] == [
        (f"{joined}:1", None),
        (f"{joined}:2", None),
    ]
    empty = tmp_path / "empty.json"
    empty.write_text("\n  \n\n")
    (r,) = split_records(str(empty), empty.read_bytes())
    assert (r.error.reason, r.error.detail) == ("invalid_json", "the file is empty")


def test_a_forced_format_names_the_shape_the_record_has():
    from soulray.data.parse import ParseSettings, normalize_record

    settings = ParseSettings("sharegpt", {}, "Others", None, 0.0)
    raw = next(split_records("x.jsonl", json.dumps({"messages": []}).encode()))
    row = normalize_record(raw, settings)
    assert (row["ok"], row["reason"]) == (False, "invalid_record")
    assert row["detail"] == (
        "'conversations' must be a list, got NoneType (data.format=sharegpt forces that shape, "
        "and this record is messages-shaped: set data.format=auto or to the corpus' format)"
    )


def test_esconv_tsv_lines_are_read_back_into_their_dialogues():
    """ESConv's *WithStrategy_short.tsv has one training example per line (a window of the
    dialogue so far): each line belongs to exactly one dialogue record, whose turns are that
    line's utterances at their indices; every line is accounted for."""
    for name, dialogues, turns in (("dev", 211, 6328), ("test", 210, 6004)):
        path = shared_path(f"esconv/{name}WithStrategy_short.tsv")
        lines = path.read_bytes().decode("utf-8").split("\r\n")
        records = list(split_records(str(path), path.read_bytes()))
        assert [r.error for r in records if r.error] == []
        assert (len(records), sum(len(r.record["dialog"]) for r in records)) == (dialogues, turns)
        covered = []
        for r in records:
            span = r.location.rsplit(":", 1)[1]
            first, _, last = span.partition("-")
            first, last = int(first), int(last or first)
            covered += range(first, last + 1)
            said = {}
            for line in lines[first - 1 : last]:
                for utterance in line.split(" EOS "):
                    _, speaker, index, text = utterance.strip().split(" ", 3)
                    said[int(index)] = (speaker, text.strip())
            got = [
                ("1" if t["speaker"] == "supporter" else "0", t["content"], t.get("annotation"))
                for t in r.record["dialog"]
            ]
            want = []
            for _, (speaker, text) in sorted(said.items()):
                tag, _, rest = text.partition("] ")
                if speaker == "1":
                    want.append((speaker, rest.strip(), {"strategy": tag[1:]}))
                else:
                    want.append((speaker, text, None))
            assert got == want, r.location
        assert covered == list(range(1, len([x for x in lines if x.strip()]) + 1))
    a = adapt([shared_path("esconv/testWithStrategy_short.tsv")])
    assert (a.formats, a.reasons) == ({"esconv": 210}, {"no_assistant_turn": 1})
    assert a.unknown == Counter()  # the raw spellings (Questions, Other) are ESConv's


def test_an_esconv_tsv_starts_a_dialogue_where_the_turns_disagree():
    """Two dialogues that both open with "Hello", a window that skips a turn, a line that is no
    ESConv line and one that is not UTF-8: each is one record, in order."""
    lines = [
        b"1.0 0 0 Hello  EOS 1.0 1 1 [Questions] How are you?",
        b"0.0 0 0 Hello  EOS 0.0 1 1 [Questions] How are you? EOS 0.0 0 2 Sad. "
        b"EOS 1.0 1 3 [Other] Why?",
        b"",
        b"0.0 0 5 Work. EOS 1.0 1 6 [Information] I see.",  # turn 4 skipped by the window
        b"0.0 0 7  EOS 1.0 1 8 [Others] Hm?",  # an empty turn (cleaning drops it)
        b"not an esconv line",
        b"1.0 0 0 Hello  EOS 1.0 1 1 [Questions] Hi! What brings you here?",
        "1.0 0 0 caf\u00e9 EOS 1.0 1 1 [Other] x".encode("latin-1"),
        b"",
    ]
    records = list(split_records("d/xWithStrategy_short.tsv", b"\r\n".join(lines)))
    assert [(r.location, r.error.reason if r.error else None) for r in records] == [
        ("d/xWithStrategy_short.tsv:1-5", None),
        ("d/xWithStrategy_short.tsv:6", "invalid_record"),
        ("d/xWithStrategy_short.tsv:7", None),
        ("d/xWithStrategy_short.tsv:8", "invalid_encoding"),
    ]
    first = to_conversation(records[0].record, "esconv", records[0].key)
    assert [(m.role, m.content, m.strategy) for m in first.messages] == [
        ("user", "Hello", None),
        ("assistant", "How are you?", "Questions"),
        ("user", "Sad.", None),
        ("assistant", "Why?", "Other"),
        ("user", "Work.", None),
        ("assistant", "I see.", "Information"),
        ("user", "", None),
        ("assistant", "Hm?", "Others"),
    ]
    assert records[1].error.detail.startswith("utterance 0 does not parse: an ESConv TSV line")
    assert records[2].record["dialog"][1]["content"] == "Hi! What brings you here?"


def test_only_esconvs_tsv_files_are_corpus_files_in_a_folder(tmp_path):
    """A folder's other .tsv files (labels, metadata) are not read as ESConv lines."""
    from soulray.data.formats import FILE_SUFFIXES
    from soulray.storage import expand_inputs

    for name in ("labels.tsv", "devWithStrategy_short.tsv", "a.json"):
        (tmp_path / name).write_text("{}\n")
    assert expand_inputs([str(tmp_path)], FILE_SUFFIXES) == [
        str(tmp_path / "a.json"),
        str(tmp_path / "devWithStrategy_short.tsv"),
    ]


def test_a_rejected_array_item_with_half_a_character_is_written_escaped():
    """The reject text of an array item is the item as JSON: with a lone UTF-16 surrogate (a
    broken emoji, rejected as such) it had no UTF-8 form, and writing the rejects file failed
    the whole job. It is written escaped, as the file had it, and reads back as the item."""
    path = "corpus.json"
    data = b'[{"messages": [{"role": "user", "content": "alone \\ud83d"}]}]'
    (record,) = split_records(path, data)
    text = record.source_text()
    assert "\\ud83d" in text and json.loads(text) == record.record
    text.encode("utf-8")  # what the rejects file needs
