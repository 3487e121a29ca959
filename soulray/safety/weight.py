"""Starving oneself said in numbers: the writer's height, a weight far under it, and a wish to
lose more.

"I'm 1.65m and 41kg and I need to lose more" and "我1米6，80斤了还要减" name no crisis word and
no pattern can read them: what makes them a crisis is arithmetic. A message is flagged self_harm
by the lexicon (lexicon.match), like any other lexicon hit, when
- it gives a height (1.65m, 165cm, 1米65, 一米六, 5'4, 5呎4, 身高165, "165，85斤") and a weight
  (41kg, 85斤, 四十公斤, 40多公斤, 90 lbs, 88磅, 7 stone) written next to it or as a goal
  ("goal weight 44kg", "瘦到38kg"), whose body-mass index is under UNDERWEIGHT_BMI (the old
  diagnostic line for anorexia nervosa; 18.5 is underweight), or states a BMI under it;
- the height, the weight and the BMI are the writer's: not said of someone or something else
  ("my daughter is 160cm", "my girlfriend is 100 lbs", "她身高160", "床垫1.5米", "my suitcase is
  50 lbs"), in a text that gives no child's age but the writer's ("for a 7 year old"), and the
  weight is no amount lost or lifted ("lost 30kg", "deadlift 40kg", "背20公斤的书包");
- and it says the writer wants to lose more ("need to lose more", "还想再瘦", "goal weight",
  "terrified to gain"), not that they must not or do not ("scared to lose more", "不能再瘦了"),
  nor that they want to gain.
The lexicon reads a message at a time; the screen also reads the person's last three messages
together (screen._numbers_across: "I'm 5'4 and 90 lbs", then "I need to lose more").
"""

from __future__ import annotations

import re

UNDERWEIGHT_BMI = 17.5
HEIGHT_M = (1.35, 2.1)  # heights outside these are not read as a person's
WEIGHT_KG = (20.0, 200.0)
PAIR_CHARS = 40  # a weight this close to a height is the height's (else only a goal weight is)
LEAD_CHARS = 200  # of a number's sentence before it, read for whose it is
MOST = 20  # heights and weights read in a text

_DIGIT = dict(zip("零〇一二两三四五六七八九", (0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9), strict=True))
_CN_NUMBER = re.compile(
    "[零〇一二两三四五六七八九十]{1,4}(?=\\s*(?:斤|公斤|千克|kg|磅|呎|吋|尺|寸))"
)
_CN_METRE = re.compile("([一二])米([一二三四五六七八九])([一二三四五六七八九])?")
_ABOUT = re.compile(r"(\d)0\s*[多几幾](?=\s*(?:斤|公斤|千克|kg|磅|lbs?))")  # 40多公斤: 45

_NUM = r"(\d{2,3}(?:\.\d)?)"
_LABEL = r"(?:体重|體重|weight|现在|現在|now|只有|才)"
_WEIGHT_AHEAD = r"\d{2,3}(?:\.\d)?\s*(?:kg|kgs|kilos?|公斤|千克|斤|lbs?|pounds|磅)(?![a-z])"
# (pattern, metres per unit of group 1, group 2's unit or 0)
_HEIGHTS: tuple[tuple[re.Pattern[str], float, float], ...] = (
    (re.compile(r"(?<![\d.])(1[.,]\d{1,2})\s*(?:m|meters?|metres?|米)(?![a-z])", re.I), 1.0, 0),
    (re.compile(r"(?<![\d.])(1)\s*(?:m|米)\s*(\d{1,2})(?!\d|\.\d)", re.I), 1.0, 0),  # 1m62, 1米6
    (re.compile(r"(?<![\d.])(1\d{2})\s*(?:cm|centimet(?:er|re)s?|厘米|公分)", re.I), 0.01, 0),
    (
        re.compile(
            r"(?<![\d.])([4-7])\s*(?:'|’|′|ft|feet|foot|呎|尺)\s*(?:(\d{1,2})\s*(?:\"|”|″|''|in|"
            r"inches|吋|寸)?)?(?!\d|\.\d)",
            re.I,
        ),
        0.3048,
        0.0254,
    ),
    # a height labelled, or a bare one just before a weight: "身高165", "height 160", "个子160",
    # "1.60 and 44kg", "165，85斤", "I'm 158 and 39kg"
    (
        re.compile(
            r"(?:身高|个子|個子|height)\s*(?:是|有|is|of|:|：)?\s*(1\d{2})(?!\d|\.\d)", re.I
        ),
        0.01,
        0,
    ),
    (
        re.compile(r"(?:身高|height)\s*(?:是|有|is|of|:|：)?\s*(1\.\d{1,2})(?!\d|\.\d)", re.I),
        1.0,
        0,
    ),
    (
        re.compile(
            rf"(?<![\d.])(1\.\d{{1,2}}|1\d{{2}})(?=\s*(?:,|，|、|/|and|&)?\s*{_LABEL}?\s*{_WEIGHT_AHEAD})"
        ),
        0.0,  # metres or centimetres by the number: see _height
        0,
    ),
)
_WEIGHTS: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?:kg|kgs|kilos?|kilograms?|公斤|千克)(?![a-z])", re.I), 1.0),
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?:lbs?|pounds|磅)(?![a-z])", re.I), 0.45359237),
    (re.compile(rf"(?<![\d.]){_NUM}\s*(?<!公)斤"), 0.5),
    (re.compile(r"(?<![\d.])(\d{1,2})\s*(?:st|stone)\b", re.I), 6.35029318),
    # a weight labelled without its unit: kg under 60, 斤 from 100 (60-99 could be either)
    (re.compile(r"(?:体重|體重|weight)\s*(?:是|有|is|of|:|：)?\s*(\d{2,3})(?!\d|\.\d)", re.I), 0.0),
)
_BMI = re.compile(
    r"(?<![a-z])bmi\s*(?:is|of|at|:|=|是|只有|才|现在|現在)?\s*(1\d(?:\.\d)?)(?!\d|\.\d)", re.I
)

# just before a weight that is an amount, not what a body weighs
_AMOUNT = re.compile(
    r"(?:\b(?:lose|lost|losing|drop|dropped|shed|gain|gained|put\s+on|another|more|down|"
    r"deadlift\w*|squat\w*|bench\w*|press\w*|lift\w*|carry\w*|bag|backpack|suitcase|luggage|"
    r"box|parcel)\s+(?:another\s+|about\s+|around\s+|like\s+|over\s+|a\s+)?"
    r"|(?:减了|减掉|瘦了|瘦下来|掉了|胖了|重了|长了|减|掉|卧推|深蹲|硬拉|举|背|装了|提)"
    r"(?:了|能推|能)?\s*)$",
    re.I,
)
# just before a weight that is a goal: paired with the height wherever it is
_GOAL = re.compile(
    r"(?:\b(?:goal(?:\s+weight)?|gw|get\s+down\s+to|go\s+down\s+to|down\s+to|reach|be|under|"
    r"until\s+i'?m(?:\s+under)?)\s*(?:is|of|:)?\s*|目标(?:体重|是)?\s*|瘦到|减到|降到|到)$",
    re.I,
)
# someone else, named: in a number's sentence before it, with the writer not named after
_PEOPLE = re.compile(
    r"\b(?:she|he|her|his|they|their|kid|child|son|daughter|friend|roommate|sister|brother|mom|"
    r"mum|mother|dad|father|grandpa|grandma|wife|husband|girlfriend|boyfriend|patient|client|"
    r"student|baby|toddler|athlete|cat|dog|puppy)\b|她|(?<!其)他(?!们的)|佢|孩子|儿子|兒子|女儿|女兒|"
    r"小朋友|宝宝|寶寶|表妹|表姐|堂妹|室友|同学|同學|朋友|闺蜜|妈|媽|爸|爷爷|奶奶|外婆|外公|老婆|老公|"
    r"男朋友|女朋友|学生|學生|运动员|運動員|猫|狗",
    re.I,
)
# something else, named in a number's own clause: its length or weight is no one's
_THINGS = re.compile(
    r"\b(?:ceilings?|bag|backpack|bike|frame|box|parcel|table|bed|mattress|suitcase|luggage|desk|"
    r"car|sofa|couch|door|fence|tree|jump\w*|throw\w*|ran|run|walked|swam|deadlift\w*|squat\w*|"
    r"bench\w*)\b|行李|箱|桌|(?<!起)床|柜|櫃|枱|车|車|天花板|跳远|跳高|跳了|扔|书包|書包",
    re.I,
)
_SENTENCE = re.compile(r"\.(?!\d)|[!?。！？\n;；]")  # not the point of 1.65
_CLAUSE = re.compile(r"\.(?!\d)|[!?。！？\n;；,，]|\b(?:but|though|although)\b|但|可是|不过|不過")
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|me|my|myself)\b|我|本人", re.I)
# a child's age, not said of the writer ("for a 7 year old", "儿子10岁"; not "I'm 12 years old")
_CHILD = re.compile(
    r"(?<!i'm )(?<!i am )(?<!was )(?<!我)(?<!我今年)"
    r"\b(?:[1-9]|1[0-2])[\s-]*(?:years?|yrs?)[\s-]*old\b"
    r"|(?<!我)(?<!我今年)(?<!\d)(?:[1-9]|1[0-2])\s*(?:岁|歲)",
    re.I,
)
_LOSE = re.compile(
    r"\b(?:lose\s+(?:more|weight|another|a\s+few|some|the\s+last|\d)|losing\s+(?:more|weight)|"
    r"keep\s+losing|drop\s+(?:more|another|a\s+few|some|to|\d)|(?:get|go)\s+down\s+to|thinner|"
    r"skinnier|(?:be|get)\s+smaller|too\s+fat|still\s+fat|so\s+fat|still\s+(?:too\s+)?big|"
    r"goal\s+(?:weight|is\s+\d)|gw|reach\s+\d|want\s+to\s+be\s+(?:under\s+)?\d|"
    r"until\s+i'?m\s+under|go\s+lower|stop(?:ped)?\s+eating|not\s+eating\s+until|starve)\b"
    r"|再瘦|还想瘦|还要瘦|仲想瘦|瘦到|减到|还要减|还想减|还是想减|仲想减|仲要减|再减|继续减|减肥|还是胖|"
    r"还胖|太胖|好胖|"
    r"目标(?:体重|是)?\s*[:：]?\s*\d|"
    r"再掉|再轻|瘦成|不吃饭|什么都不吃|不吃东西|绝食|断食",
    re.I,
)
# said just before a wish to lose, it is no wish: a person ill or in recovery
_NOT_WISH = re.compile(
    r"(?:\b(?:not|don't|dont|do\s+not|never|stop|scared\s+to|afraid\s+to|terrified\s+to|worried\s+"
    r"(?:i'?ll|to)|must\s+not|mustn't|can't|cannot|shouldn't|no\s+longer|not\s+trying\s+to)\b"
    r"|不想|不能|不可以|唔可以|唔好|别|別|不要|怕|担心|擔心|不用|没必要|沒必要|不需要|不该|不應|不应)"
    r"[^.!?。！？\n,，]{0,12}$",
    re.I,
)
# fear of gaining says the same as a wish to lose
_FEAR_GAIN = re.compile(
    r"\b(?:terrified|scared|afraid|fear)\s+(?:of|to)\s+(?:gain\w*|get\w*\s+fat|put\w*\s+on)"
    r"|怕(?:长胖|變胖|变胖|胖|长肉|長胖)",
    re.I,
)
# the writer's own wish to gain ("my therapist wants me to gain" is not theirs)
_GAIN = re.compile(
    r"\bi\s+(?:really\s+)?(?:want|need|am\s+trying|'m\s+trying|try|plan)\s+to\s+(?:gain|put\s+on|"
    r"bulk)|\bhow\s+(?:do|can|should)\s+i\s+(?:gain|put\s+on)|\bhelp\s+me\s+(?:gain|put\s+on)"
    r"|我(?:想|要|在)(?:增重|长胖|增肥|长肉|胖一点)|(?:怎么|如何|怎樣|点样)(?:增重|长胖|增肥|长肉)",
    re.I,
)


def _arabic(text: str) -> str:
    """Chinese numerals of heights and weights as digits ("一米六" 1米6, "八十斤" 80斤), and a
    rough number of tens as its middle ("40多公斤" 45公斤)."""

    def number(m: re.Match[str]) -> str:
        s, total = m.group(0), 0
        if "十" in s:
            tens, _, ones = s.partition("十")
            total = (_DIGIT.get(tens, 1) if tens else 1) * 10 + (_DIGIT.get(ones, 0) if ones else 0)
        else:
            total = int("".join(str(_DIGIT[c]) for c in s if c in _DIGIT) or 0)
        return str(total)

    text = _CN_METRE.sub(
        lambda m: (
            f"{_DIGIT[m.group(1)]}米{_DIGIT[m.group(2)]}"
            + (str(_DIGIT[m.group(3)]) if m.group(3) else "")
        ),
        text,
    )
    text = _CN_NUMBER.sub(number, text)
    return _ABOUT.sub(lambda m: f"{m.group(1)}5", text)


def _height(m: re.Match[str], per: float, per2: float) -> float:
    first = float(m.group(1).replace(",", "."))
    if per == 0.0:  # a bare number: metres when it has a point, else centimetres
        return first if "." in m.group(1) else first / 100
    second = m.group(2) if m.re.groups >= 2 else None
    if per2:  # feet and inches
        return first * per + int(second or 0) * per2
    if second is not None:  # 1m62, 1米6: the digits after the unit are the decimals
        return float(f"{m.group(1)}.{second}")
    return first * per


def heights(text: str) -> list[float]:
    """Every height the text gives, in metres (within HEIGHT_M)."""
    return [h for h, _, _ in _heights(_arabic(text))]


def weights(text: str) -> list[float]:
    """Every weight the text gives, in kilograms (within WEIGHT_KG), but amounts lost, gained,
    lifted or carried ("lose 25kg", "减了20斤", "deadlift 40kg"): a body does not weigh them."""
    return [w for w, _, _, _ in _weights(_arabic(text))]


def _heights(text: str) -> list[tuple[float, int, int]]:
    """(metres, start, end) of each height in `text` (its numerals _arabic already)."""
    found: list[tuple[float, int, int]] = []
    for rule, per, per2 in _HEIGHTS:
        for m in rule.finditer(text):
            h = _height(m, per, per2)
            if HEIGHT_M[0] <= h <= HEIGHT_M[1] and not any(
                s < m.end() and m.start() < e for _, s, e in found
            ):  # one number read once, by the first rule that reads it
                found.append((h, m.start(), m.end()))
    return sorted(found, key=lambda f: f[1])


def _weights(text: str) -> list[tuple[float, int, int, bool]]:
    """(kilograms, start, end, a goal) of each weight in `text` (its numerals _arabic already)."""
    found: list[tuple[float, int, int, bool]] = []
    for rule, scale in _WEIGHTS:
        for m in rule.finditer(text):
            before = text[max(0, m.start() - 24) : m.start()]
            if _AMOUNT.search(before) or any(s < m.end() and m.start() < e for _, s, e, _ in found):
                continue
            value = float(m.group(1))
            w = (
                value * scale
                if scale
                else (value if value < 60 else value / 2 if value >= 100 else 0)
            )
            if WEIGHT_KG[0] <= w <= WEIGHT_KG[1]:
                found.append((w, m.start(), m.end(), bool(_GOAL.search(before))))
    return sorted(found, key=lambda f: f[1])


def _wish_to_lose(text: str) -> bool:
    wishes = [
        m
        for m in _LOSE.finditer(text)
        if not _NOT_WISH.search(text, max(0, m.start() - 40), m.start())
    ]
    return bool(wishes or _FEAR_GAIN.search(text)) and not _GAIN.search(text)


def _writers(text: str, start: int) -> bool:
    """Whether the number at `start` is the writer's: its clause (from the last comma or "but")
    names no thing ("my bag is 20kg", "床垫1.5米"), and its sentence names no one else before it
    unless the writer is named after them ("my son weighs 60 lbs", "她身高160" and "My sister
    just turned 20, 160cm and 40kg" are not; "my mom says I'm too thin but I'm 5'3" is)."""
    lead = text[max(0, start - LEAD_CHARS) : start]
    sentence = lead[max((m.end() for m in _SENTENCE.finditer(lead)), default=0) :]
    clause = sentence[max((m.end() for m in _CLAUSE.finditer(sentence)), default=0) :]
    if _THINGS.search(clause):
        return False
    other = max((m.end() for m in _PEOPLE.finditer(sentence)), default=-1)
    mine = max((m.start() for m in _FIRST_PERSON.finditer(sentence)), default=-1)
    return mine >= other


def underweight_wish(text: str) -> bool:
    """The writer's height and a weight of theirs under UNDERWEIGHT_BMI at it (written next to
    it, or a goal), or a BMI of theirs under it stated, and a wish to lose more; never for a
    text that gives a child's age (not the writer's)."""
    text = _arabic(text)
    if not _wish_to_lose(text) or _CHILD.search(text):
        return False
    if any(
        float(m.group(1)) < UNDERWEIGHT_BMI and _writers(text, m.start())
        for m in _BMI.finditer(text)
    ):
        return True
    ws = [w for w in _weights(text)[:MOST] if _writers(text, w[1])]
    for h, start, end in _heights(text)[:MOST]:
        if not _writers(text, start):
            continue
        near = [w for w in ws if min(abs(w[1] - end), abs(start - w[2])) <= PAIR_CHARS]
        nearest = min(near, key=lambda w: min(abs(w[1] - end), abs(start - w[2])), default=None)
        paired = [w for w in ws if w[3]] + ([nearest] if nearest else [])
        if any(w / h**2 < UNDERWEIGHT_BMI for w, _, _, _ in paired):
            return True
    return False
