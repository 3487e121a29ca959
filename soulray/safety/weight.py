"""Starving oneself said in numbers: a height, a weight, and a wish to lose more.

"I'm 1.65m and 41kg and I need to lose more" and "我身高160，80斤了还想再瘦" name no crisis word
and no pattern can read them: what makes them a crisis is arithmetic. A message that gives the
writer's height and a weight whose body-mass index is under UNDERWEIGHT_BMI (the old diagnostic
line for anorexia nervosa; 18.5 is underweight) and says they want to lose more is flagged
self_harm by the lexicon (lexicon.match), like any other lexicon hit. A wish to gain, or a
height and weight that are someone else's ("my daughter is 160cm and 40kg"), is not.
"""

from __future__ import annotations

import re

UNDERWEIGHT_BMI = 17.5
HEIGHT_M = (1.2, 2.2)  # heights outside these are not read as the writer's
WEIGHT_KG = (20.0, 200.0)

_NUM = r"(\d{1,3}(?:\.\d{1,2})?)"
_WEIGHT_AHEAD = r"\d{2,3}(?:\.\d)?\s*(?:kg|kgs|kilos?|公斤|斤|lbs?|pounds)"
# each: a pattern, and what turns its groups into metres
_HEIGHTS: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?:m|meters?|metres?|米)(?![a-z])(?!\s*\d)", re.I), 1.0),
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?:cm|centimet(?:er|re)s?|厘米|公分)", re.I), 0.01),
    (re.compile(r"身高\s*(?:是|有)?\s*(\d{3})(?!\s*(?:kg|公斤|斤|磅|lb))", re.I), 0.01),
    # a bare height just before a weight: "1.60 and 44kg", "165，85斤", "160/40kg"
    (re.compile(rf"(?<![\d.])(1\.[4-9]\d?)(?=\s*(?:,|，|/|and|&)?\s*{_WEIGHT_AHEAD})", re.I), 1.0),
    (re.compile(rf"(?<![\d.])(1[4-9]\d)(?=\s*[,，、/ ]\s*{_WEIGHT_AHEAD})", re.I), 0.01),
)
_METRE_CM = re.compile(r"(?<![\d.])([12])\s*米\s*(\d{1,2})(?!\d)")  # 1米65, 1米6
_FEET = re.compile(
    r"(?<![\d.])([4-7])\s*(?:'|’|ft|feet|foot)\s*(?:(\d{1,2})\s*(?:\"|”|''|in|inches)?)?(?![\d.])",
    re.I,
)
_WEIGHTS: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?:kg|kgs|kilos?|kilograms?|公斤|千克)", re.I), 1.0),
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?:lbs?|pounds)\b", re.I), 0.45359237),
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?<!公)斤"), 0.5),
)
_LOSE = re.compile(
    r"\b(?:lose\s+(?:more|weight|another|a\s+few|some|the\s+last|\d)|losing\s+(?:more|weight)|"
    r"drop\s+(?:more|another|a\s+few|some|to|\d)|(?:get|go)\s+down\s+to|thinner|skinnier|"
    r"too\s+fat|still\s+fat|so\s+fat|still\s+(?:too\s+)?big|goal\s+weight|stop\s+eating)\b"
    r"|再瘦|还想瘦|还要瘦|瘦到|减到|还要减|还想减|再减|继续减|减肥|还是胖|还胖|太胖|好胖|目标体重",
    re.I,
)
_GAIN = re.compile(
    r"\b(?:gain|gaining|put\s+on|bulk|underweight\s+and\s+want)\b|增重|增肥|长胖|胖一点|长肉|增加体重",
    re.I,
)
# what comes just before an amount of weight, not a weight
_AMOUNT = re.compile(
    r"(?:\b(?:lose|lost|losing|drop|dropped|shed|gain|gained|put\s+on|another|more)\s+"
    r"(?:another\s+|about\s+|around\s+|like\s+|over\s+)?"
    r"|(?:减了|减掉|瘦了|掉了|胖了|重了|长了|减|掉|多|再瘦|再减)\s*)$",
    re.I,
)
# someone else's height and weight: a person named before the numbers
_OTHER = re.compile(
    r"\b(?:my|our)\s+(?:daughter|son|sister|brother|friend|kid|child|girlfriend|boyfriend|wife|"
    r"husband|mom|mum|mother|dad|father|patient|student|cat|dog)\b|\b(?:she|he)(?:'s|\s+is|\s+was)\b"
    r"|(?:我|我们)(?:的)?(?:女儿|儿子|妹妹|姐姐|弟弟|哥哥|朋友|孩子|闺蜜|老婆|老公|女朋友|男朋友|妈|爸|学生|猫|狗)",
    re.I,
)


def heights(text: str) -> list[float]:
    """Every height the text gives, in metres (within HEIGHT_M)."""
    found = [float(m.group(1)) * scale for rule, scale in _HEIGHTS for m in rule.finditer(text)]
    found += [float(f"{m.group(1)}.{m.group(2)}") for m in _METRE_CM.finditer(text)]
    found += [
        (int(m.group(1)) * 12 + int(m.group(2) or 0)) * 0.0254
        for m in _FEET.finditer(text)
        if int(m.group(2) or 0) < 12
    ]
    return [h for h in found if HEIGHT_M[0] <= h <= HEIGHT_M[1]]


def weights(text: str) -> list[float]:
    """Every weight the text gives, in kilograms (within WEIGHT_KG), but amounts lost or gained
    ("lose 25kg", "减了20斤"): a body does not weigh them."""
    found = [
        float(m.group(1)) * scale
        for rule, scale in _WEIGHTS
        for m in rule.finditer(text)
        if not _AMOUNT.search(text, max(0, m.start() - 24), m.start())
    ]
    return [w for w in found if WEIGHT_KG[0] <= w <= WEIGHT_KG[1]]


def underweight_wish(text: str) -> bool:
    """The writer's height, a weight under UNDERWEIGHT_BMI at it (now or as a goal), and a wish
    to lose more; not a wish to gain, nor someone else's numbers."""
    if not _LOSE.search(text) or _GAIN.search(text) or _OTHER.search(text):
        return False
    hs, ws = heights(text), weights(text)
    return any(w / h**2 < UNDERWEIGHT_BMI for h in hs for w in ws)
