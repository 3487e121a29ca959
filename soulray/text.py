"""Which language a text is in, the one way eval and synth both decide it."""

from __future__ import annotations

import re
from typing import Literal

Language = Literal["zh", "en"]

# CJK ideographs: Extension A, the Unified block, and the Compatibility block
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def detect_language(text: str) -> Language:
    """zh when a fifth or more of the non-space characters are CJK ideographs, else en."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "en"
    return "zh" if sum(bool(CJK.match(c)) for c in chars) * 5 >= len(chars) else "en"
