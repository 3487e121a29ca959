"""Load the tokenizer for a run, or train a small byte-level BPE one on the corpus.

The tokenizer used by prepare is saved with the prepared data (with its chat template), and
training and serving load that copy, so all three stages agree on ids and template.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from soulray.data.render import CHATML_TEMPLATE, ensure_chat_template

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# Qwen2's pre-tokenizer (transformers' tokenization_qwen2.py): a tiny qwen2 export is loaded by
# AutoTokenizer as Qwen2Tokenizer, which rebuilds its normalizer and pre-tokenizer from its own
# definition whatever tokenizer.json says, so the trained tokenizer splits text the same way or
# the export would tokenize unlike the data it trained on (digits, for one).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer with ChatML special tokens and template, splitting text
    as Qwen2Tokenizer does (QWEN2_SPLIT, NFC)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """Load a Hugging Face tokenizer directory (fast tokenizers only) and give it a template."""
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    if local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): model.name_or_path "
            "(or model.tokenizer) must be a Hugging Face model directory"
        )
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"the tokenizer at {path} is a slow (Python) tokenizer; soulray needs a fast one "
            "(a tokenizer.json), which gives the character offsets that label masking uses"
        )
    ensure_chat_template(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_files(directory: str | Path) -> dict[str, bytes]:
    """Every file of a saved tokenizer, so it can travel to Ray actors on any node."""
    root = Path(directory)
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def write_tokenizer_files(files: dict[str, bytes], directory: str | Path) -> Path:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def load_tokenizer_from_files(files: dict[str, bytes], trust_remote_code: bool = False) -> Any:
    """A tokenizer from tokenizer_files() (sent to an actor, or read from object storage),
    through a temporary folder that is gone once it is loaded (it lives in memory then)."""
    with tempfile.TemporaryDirectory(prefix="soulray-tok-") as directory:
        return load_tokenizer(str(write_tokenizer_files(files, directory)), trust_remote_code)


def tokenizer_hash(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(files[name])
    return h.hexdigest()[:16]
