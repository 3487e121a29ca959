"""Which language a text is in, the one way eval and synth both decide it; and half a UTF-16
pair, which text from JSON may hold and UTF-8 cannot."""

from __future__ import annotations

import re
from typing import Literal

Language = Literal["zh", "en"]

# CJK ideographs: Extension A, the Unified block, and the Compatibility block
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# a lone UTF-16 surrogate: a JSON escape of half an emoji ("\\ud83d") decodes to one
SURROGATE = re.compile("[\ud800-\udfff]")


def detect_language(text: str) -> Language:
    """zh when a fifth or more of the non-space characters are CJK ideographs, else en."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "en"
    return "zh" if sum(bool(CJK.match(c)) for c in chars) * 5 >= len(chars) else "en"
