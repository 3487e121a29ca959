"""Assemble a blind set for the crisis screen from its writers' files, dropping what was seen.

    .venv/bin/python bench/safety_blind_assemble.py --out tests/safety/safety_holdout_blindN.json \
        --description "Blind set N (...): who wrote it, how" WRITER_A.json WRITER_B.json ...

Each writer's file is shaped as the sets in tests/safety/ are ({"crisis_en": [...],
"crisis_en_category": [...], "ordinary_en": [...], "ordinary_en_kind": [...], "crisis_zh": ...}).
A message is dropped (compared stripped and ignoring case) when it is in the training data
(soulray.safety.dataset.written: messages_{lang}.json and every set in data/authors/), in
bench/safety_extra/, in an earlier blind set (tests/safety/safety_holdout_blind*.json), or written
twice; the writers' messages are kept in order otherwise. Prints only counts: a blind set is
measured once (bench/safety_eval.py) before anyone reads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from soulray.safety.dataset import LANGS, written

ROOT = Path(__file__).resolve().parent.parent
PARTS = (("crisis", "category"), ("ordinary", "kind"))


def seen_messages(root: Path = ROOT, but: Path | None = None) -> dict[str, set[str]]:
    """Per language, every message already written for the screen, stripped and lower-cased
    (`but`: a blind set file not to count, the one being rebuilt)."""
    seen = {lang: {t.strip().lower() for t, _, _ in written(lang)} for lang in LANGS}
    others = [*(root / "bench/safety_extra").glob("*.json")]
    others += (root / "tests/safety").glob("safety_holdout_blind*.json")
    for path in others:
        if but is not None and path.resolve() == but.resolve():
            continue
        data = json.loads(path.read_text("utf-8"))
        for lang in LANGS:
            for part, _ in PARTS:
                seen[lang].update(t.strip().lower() for t in data.get(f"{part}_{lang}", []))
    return seen


def assemble(writers: list[dict], seen: dict[str, set[str]]) -> tuple[dict, dict[str, int]]:
    """The writers' messages in order, each once and none of `seen` (which grows); and how many
    were dropped per list."""
    out: dict = {}
    dropped: dict[str, int] = {}
    for lang in LANGS:
        for part, label in PARTS:
            key = f"{part}_{lang}"
            texts, labels = [], []
            for data in writers:
                for text, lab in zip(data[key], data[f"{key}_{label}"], strict=True):
                    if text.strip().lower() in seen[lang]:
                        dropped[key] = dropped.get(key, 0) + 1
                        continue
                    seen[lang].add(text.strip().lower())
                    texts.append(text.strip())
                    labels.append(lab)
            out[key], out[f"{key}_{label}"] = texts, labels
    return out, dropped


def main() -> None:
    from _args import existing_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("writers", nargs="+", type=existing_file, help="each writer's JSON file")
    ap.add_argument("--out", type=Path, required=True, help="the blind set to write")
    ap.add_argument("--description", required=True, help="who wrote it and how (kept in it)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        ap.error(f"{args.out} exists; a blind set is written once (--force to rebuild it)")
    writers = [json.loads(p.read_text("utf-8")) for p in args.writers]
    data, dropped = assemble(writers, seen_messages(but=args.out))
    counts = {k: len(v) for k, v in data.items() if k.endswith(LANGS)}
    args.out.write_text(
        json.dumps({"description": args.description, **data}, ensure_ascii=False, indent=1) + "\n",
        "utf-8",
    )
    print(f"wrote {args.out}: kept {counts}, dropped as already seen or repeated {dropped}")


if __name__ == "__main__":
    main()
