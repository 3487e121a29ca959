"""The one language rule eval and synth share."""

from __future__ import annotations

from soulray.text import detect_language


def test_a_fifth_of_cjk_characters_make_a_text_chinese():
    assert detect_language("我今天很难过 OK") == "zh"
    assert detect_language("I feel lonely 哦") == "en"
    assert detect_language("") == "en"


def test_exactly_one_fifth_is_chinese_and_just_under_is_english():
    """1 CJK of 5 non-space characters is a fifth (zh); 1 of 6 is under it (en); spaces
    do not count."""
    assert detect_language("我abcd") == "zh"
    assert detect_language("我abcde") == "en"
    assert detect_language("我 a b c d") == "zh"


def test_extension_a_and_compatibility_ideographs_count_as_cjk():
    assert detect_language("\u3400\u4db5") == "zh"  # CJK Extension A
    assert detect_language("\uf900\ufa0e") == "zh"  # CJK Compatibility Ideographs
