"""The training set: hand-written messages (data/messages_{lang}.json) and their wrapped variants.

Every message is written for this project (no internet corpora: those teach "forum post vs. chat",
not "crisis vs. not"). Two sources:
- data/messages_{lang}.json, the rounds written alongside the classifier;
- data/authors/*.json, sets by other writers, one file each, shaped as the blind sets are
  ({"crisis_en": [...], "crisis_en_category": [...], "ordinary_en": [...], ...}): blind sets 3-11,
  each written by a helper (3-8) or three helpers (9-11) who saw neither the code nor the training
  data, then measured once as a blind set and used as a regression set, and helper_A-D and I-K,
  written as training data by seven helpers in different voices (students; older adults; context
  and mid-conversation fragments; regional English and Traditional or dialect Chinese; working
  people outside big cities; replies in the middle of a conversation; many life situations),
  and helper_S and helper_T (stop 26), two more helpers' sets of mostly SHORT messages as people
  send them mid-conversation ("ok thanks", "tell me more", "我明白了", "i want to die"): the
  softmax head had flagged short everyday replies ("thanks", "I see", "sure", "我不知道") as
  crisis, for want of short ordinary messages to learn from; and helper_X and helper_Y (stop 35),
  two more helpers' sets of ways to end or pause a chat (goodbyes, leaving for work or sleep,
  "tell me more", sad but safe closings; 120 per language each) beside real final goodbyes (40
  each): the stop-34 weights flagged ten short farewells ("goodbye", "再见", "我走了"), the
  e5 embedding putting them near the goodbyes people write before suicide.
  Training on other writers' messages is what the leave-one-blind-set-out bench showed to help a
  new writer most (bench/RESULTS.md).
Each hand-written message appears as written and in `VARIANTS` wrapped
forms (an opener and/or closer from data/wrappers.json, the same pool for every label, drawn with
a fixed seed). VARIANTS is 0 since stop 24: with the newest nine writers' sets held out (blind
sets 9-11, helper_I-K: ~900 crisis and ~1,050 ordinary messages per language), training with one
wrapped variant per message or none caught the same within a point at the same false alarms,
with the same recall/false-alarm curve (bench/RESULTS.md, stop 24), and none is 40 % fewer rows
to embed. Variants share their source's `group`, so cross-validation folds split by group and a
message's variants never score each other. The set is built on load (0.2 s), not stored;
`python -m soulray.safety.dataset --out DIR` writes it to DIR/train_{lang}.jsonl to read it.
train.py records its sha256 in weights.npz (`data_sha256`), and a test checks that the shipped
weights were fit on exactly what this module builds now.

Long messages: for LONG_SHARE of the hand-written messages one more variant puts the message
among 2-3 ordinary sentences (data/wrappers.json "fillers", the same pool for every label), at
the start, middle or end, at most LONG_MAX_CHARS long so the whole of it is screened. A person
often says the thing that matters in one sentence of an otherwise ordinary message, and a
classifier trained on short messages alone lets the ordinary talk around it drown it out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from soulray.config import SAFETY_CATEGORIES

CATEGORIES = SAFETY_CATEGORIES
LANGS = ("en", "zh")
VARIANTS = 0
LONG_SHARE = 0.5
LONG_MAX_CHARS = 380
SEED = 11
# the other writers' names for the kinds of ordinary message that messages_{lang}.json names so
KIND_NAMES = {"worry_friend": "friend", "medical": "medication"}


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    label: str  # a category, or "none"
    kind: str  # the category, or the kind of ordinary message (idiom, grief, ...)
    group: str  # the hand-written source: its variants share it
    lang: str


def _data(name: str) -> str:
    return resources.files("soulray.safety").joinpath(f"data/{name}").read_text("utf-8")


def authors() -> list[str]:
    """The names of the other writers' sets in data/authors/, in the order they are read."""
    files = resources.files("soulray.safety").joinpath("data/authors").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def authored(name: str, lang: str) -> list[tuple[str, str, str]]:
    """(text, label, kind) of one writer's set, in one language: data/authors/NAME.json, or a
    file of that shape elsewhere when `name` is a path ending in .json (bench/safety_extra/)."""
    raw = Path(name).read_text("utf-8") if name.endswith(".json") else _data(f"authors/{name}.json")
    data = json.loads(raw)
    crisis = data[f"crisis_{lang}"]
    rows = [(t, c, c) for t, c in zip(crisis, data[f"crisis_{lang}_category"], strict=True)]
    ordinary = data[f"ordinary_{lang}"]
    kinds = data.get(f"ordinary_{lang}_kind") or ["unlabelled"] * len(ordinary)
    return rows + [(t, "none", KIND_NAMES.get(k, k)) for t, k in zip(ordinary, kinds, strict=True)]


def written(lang: str, writers: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(text, label, kind) of every hand-written message of one language: the rounds in
    messages_{lang}.json, then the sets of `writers` (default: every file in data/authors/), each
    message once (ignoring case)."""
    data = json.loads(_data(f"messages_{lang}.json"))
    rows = [(t, c, c) for c in CATEGORIES for t in data[c]]
    rows += [(t, "none", kind) for kind, texts in data["none"].items() for t in texts]
    for name in authors() if writers is None else writers:
        rows += authored(name, lang)
    once: dict[str, tuple[str, str, str]] = {}  # two writers wrote a few of the same messages
    for row in rows:  # (always with the same label); the first writer's row is kept
        once.setdefault(row[0].lower(), row)
    return list(once.values())


def build_examples(lang: str, writers: Sequence[str] | None = None) -> list[Example]:
    """The hand-written messages (`written(lang, writers)`) and their wrapped variants,
    deterministically."""
    wrap = json.loads(_data("wrappers.json"))[lang]
    rng = random.Random(f"{SEED}-{lang}")
    out: list[Example] = []
    taken: set[str] = set()  # every text once: a variant can equal another written message

    def add(text: str, label: str, kind: str, group: str) -> None:
        if text not in taken:
            taken.add(text)
            out.append(Example(text, label, kind, group, lang))

    for i, (text, label, kind) in enumerate(written(lang, writers)):
        group = f"{lang}-{i}"
        add(text, label, kind, group)
        for _ in range(VARIANTS):
            add(_wrap(text, wrap, rng, lang), label, kind, group)
        if rng.random() < LONG_SHARE:
            add(_embed_in_talk(text, wrap["fillers"], rng, lang), label, kind, group)
    return out


def _embed_in_talk(text: str, fillers: list[str], rng: random.Random, lang: str) -> str:
    """The message among 2-3 ordinary sentences, at most LONG_MAX_CHARS characters."""
    around = rng.sample(fillers, rng.choice((2, 3)))
    at = rng.randrange(len(around) + 1)
    end = "" if text[-1:] in ".。!！?？…" else ("。" if lang == "zh" else ".")
    parts = [*around[:at], text + end, *around[at:]]
    while len(" ".join(parts)) > LONG_MAX_CHARS and len(parts) > 2:
        parts.remove(around.pop())
    return ("" if lang == "zh" else " ").join(parts)


def _wrap(text: str, wrap: dict[str, list[str]], rng: random.Random, lang: str) -> str:
    how = rng.choice(("open", "close", "both"))
    opener = rng.choice(wrap["openers"]) if how != "close" else ""
    closer = rng.choice(wrap["closers"]) if how != "open" else ""
    body = text.rstrip(".。!！?？") if closer else text
    out = f"{opener}{body}{closer}"
    if lang == "en" and rng.random() < 0.4:
        out = out[0].upper() + out[1:]
    return out


def load_examples(lang: str) -> list[Example]:
    """The training set of one language, what train.py fits on (built, deterministically)."""
    return build_examples(lang)


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the examples as jsonl lines (text, label, kind, group, lang), in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update((json.dumps(_as_dict(e), ensure_ascii=False) + "\n").encode("utf-8"))
    return h.hexdigest()


def write_examples(directory: Path) -> dict[str, int]:
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for lang in LANGS:
        rows = build_examples(lang)
        lines = [json.dumps(_as_dict(e), ensure_ascii=False) for e in rows]
        (directory / f"train_{lang}.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
        counts[lang] = len(rows)
    return counts


def _as_dict(e: Example) -> dict[str, str]:
    return {"text": e.text, "label": e.label, "kind": e.kind, "group": e.group, "lang": e.lang}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write the crisis classifier's training set as jsonl.")
    ap.add_argument("--out", type=Path, default=Path("safety_train"), help="folder to write to")
    args = ap.parse_args()
    print(write_examples(args.out), "->", args.out)
