"""The lexicon: a high-precision override of the classifier (a match always flags).

Three kinds of rule, all in data/lexicon.json (overridable in serve.safety):
- `intent`: phrases that state intent by themselves ("kill myself", "死了算了"). They are matched on
  the message as written, so no idiom exclusion can blank them: "我真的好累死了算了" keeps its
  "死了算了" even though "累死了" is an idiom.
- `lexicon` (phrases) and `patterns` (regexes): matched after the `exclude` regexes have blanked
  the idioms that borrow crisis words ("this exam is killing me", "累死了", "想死你了").
English phrases also match inflected forms ("hang myself" matches "hanging myself").

Precision: every rule must state crisis by itself, in the first person. Topic words
("suicide", "自杀", "自残", "家暴", "overdose") and bare threats ("kill him", "shoot her") are
not: grief, the news, a worried friend and jokes use them, and with them in the list the
lexicon alone flagged ~10 % of the hand-written ordinary training messages (and 11 % of blind
set 4's English ordinary ones).
Those messages are left to the classifier, which weighs the rest of the sentence; the lexicon now
keeps first-person forms ("i'm suicidal", "我想自杀", "家暴我"). `tests/safety` checks how many
hand-written ordinary training messages it flags. A rule earns its place by catching what the
classifier misses: stop 25 removed six Chinese rules (活着没意思 and its twin 活着没有意思, which
nothing hit, their pattern, 东西送人, a roof-and-jump pattern, 我自杀过) and cut 掐死 and 会杀人
from two more: on the training set out of fold and on the held-out test sets they flagged
ordinary messages the classifier passes and caught no crisis message it misses (a worried
friend quoting "活着没意思", a film's rooftop scene, an attempt years ago).

- `reply_patterns` (regexes): matched on the model's reply alone, never on a person's message.
  The issue's rule is that a reply must never give method details, and the classifier, trained
  on people's messages, scores such a reply low ("Take 40 of your sleeping pills with alcohol":
  0.52 for suicide, under the reply threshold of 0.9). Each names a method together with how,
  how much, where, how certain, or how to hide it or not be stopped; a method named alone is
  not one ("are you thinking of hanging yourself?" is what a counselor should ask). None of the
  14,359 counselor replies of the corpora in ../shared/data matches one (tests/safety).

- `guard`: a rule's hit does not count when the sentence around it says it is someone else's,
  negated or past: "my friend says she wants to jump off a building", "我不想死", "以前那些想死的
  念头". Each guard has a `before` regex (matched on the sentence up to the hit, so anchored with
  `$`) and/or an `after` regex (on the sentence after the hit, anchored with `^`); both must
  match, and `hit`, when given, on the hit itself ("不想死" is negated, "不想再拖累家人" is
  not). A guard marked `others` (a third party's words or acts) never clears a hit the writer is
  in: one that names them ("he told me to kill myself") or follows them as subject or object in
  the sentence ("me and my sister both want to die", "我恨我爸想死"). Guards leave abuse alone:
  its rules are about what another person does to the writer. Guards err towards flagging: a
  crisis statement they wrongly clear is a person let through, so each guard is narrow.
"""

from __future__ import annotations

import bisect
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from soulray.config import GuardRule
from soulray.safety.features import char_class
from soulray.safety.weight import underweight_wish

UNGUARDED = frozenset({"abuse"})
_SENTENCE_END = re.compile(r"[.!?。！？;；\n]")
_WRITER = re.compile(r"\b(i|i'm|i've|i'd|i'll|me|my|myself|mine)\b|我")
# the writer as a subject or object before the hit ("me and my sister both want to die", "我恨我爸
# 想死"), not as a possessive ("my friend says", "我朋友说", "室友跟我说")
_SUBJECT = re.compile(
    r"\b(i|i'm|i've|i'd|i'll|me|we|we're|we've|us|myself)\b"
    r"|(?<![跟和对给诉问])我(?!的|们的|朋友|室友|舍友|同学|同桌|同事|闺蜜|兄弟|弟|妹|哥|姐|爸|妈|儿子|女儿"
    r"|孩子|老公|老婆|男朋友|女朋友|对象|家|们宿舍|们班|爷爷|奶奶|外公|外婆|姥姥|姥爷|父亲|母亲|老师|邻居)"
)
CONTEXT = 200  # characters of the sentence a guard sees either side of a hit
MAX_GUARDED = 50  # hits of one rule that guards may clear before it flags regardless


@dataclass(frozen=True, slots=True)
class Guard:
    before: re.Pattern[str] | None
    after: re.Pattern[str] | None
    hit: re.Pattern[str] | None  # the guard applies only to hits this matches
    others: bool  # a third party's words or acts: never clears a hit that names the writer


@dataclass(frozen=True, slots=True)
class Lexicon:
    intent: dict[str, tuple[re.Pattern[str], ...]]  # matched on the text as written
    rules: dict[str, tuple[re.Pattern[str], ...]]  # matched after exclusions
    exclude: tuple[re.Pattern[str], ...]
    guards: tuple[Guard, ...] = ()
    reply: dict[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)  # replies alone


def load_builtin() -> dict[str, Any]:
    """data/lexicon.json as a mapping (intent, lexicon, patterns, exclude)."""
    text = resources.files("soulray.safety").joinpath("data/lexicon.json").read_text("utf-8")
    return json.loads(text)


def build_lexicon(
    intent: dict[str, list[str]],
    lexicon: dict[str, list[str]],
    patterns: dict[str, list[str]],
    exclude: list[str],
    guard: Sequence[dict[str, Any] | GuardRule] | None = None,
    reply_patterns: dict[str, list[str]] | None = None,
) -> Lexicon:
    return Lexicon(
        intent={c: tuple(_compile(_phrase_regex(p)) for p in ps) for c, ps in intent.items()},
        rules={
            c: tuple(
                [_compile(_phrase_regex(p)) for p in lexicon.get(c, [])]
                + [_compile(p) for p in patterns.get(c, [])]
            )
            for c in sorted({*lexicon, *patterns})
        },
        exclude=tuple(_compile(p) for p in exclude),
        guards=tuple(_guard(g) for g in guard or ()),
        reply={c: tuple(_compile(p) for p in ps) for c, ps in (reply_patterns or {}).items()},
    )


def _guard(g: dict[str, Any] | GuardRule) -> Guard:
    rule = GuardRule.model_validate(g)  # the config's model: unknown keys and empties refused
    return Guard(
        _compile(rule.before) if rule.before else None,
        _compile(rule.after) if rule.after else None,
        _compile(rule.hit) if rule.hit else None,
        rule.others,
    )


_PRONOUNS = frozenset({"i", "me", "my", "myself", "him", "her", "them", "it"})


def _phrase_regex(phrase: str) -> str:
    if not phrase.isascii():
        return re.escape(phrase.lower())
    words = [
        re.escape(w) + (r"\b" if w in _PRONOUNS else r"\w{0,4}") for w in phrase.lower().split()
    ]  # verbs inflect ("hanging myself"); pronouns do not ("stab her" is not "stab herself")
    return r"\b" + r"\s+".join(words)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"serve.safety pattern {pattern!r} is not a valid regex: {e}") from None


def match(lex: Lexicon, text: str) -> list[str]:
    """The categories the lexicon finds in one normalized message (empty = none), read as
    written and in its other forms (forms_of): in Traditional characters, or with spaces,
    dashes or emoji between the characters of a Chinese phrase, a person says the same thing."""
    found: set[str] = set()
    for form in forms_of(text):
        found |= {c for c, rules in lex.intent.items() if _hits(lex, c, rules, form)}
        cleaned = blank_idioms(lex, form)
        found |= {c for c, rules in lex.rules.items() if _hits(lex, c, rules, cleaned)}
        if underweight_wish(form):  # a height, a weight far under it and a wish to lose more
            found.add("self_harm")
    return sorted(found)


def _traditional() -> dict[int, str]:
    text = resources.files("soulray.safety").joinpath("data/t2s.json").read_text("utf-8")
    return {ord(t): s for t, s in json.loads(text)["map"].items()}


_SIMPLIFIED = _traditional()
_SIMPLIFIED[ord("著")] = "着"  # 活著 -> 活着: OpenCC keeps 著 (著名); the phrases write 着
# between two Chinese characters, up to 3 of what no phrase has there and no sentence uses to
# mark its parts: emoji, symbols, hyphens, middle dots, asterisks ("自-杀", "我😭想😭死", "想*死").
# Not spaces, quotes, brackets, dots, the em dash or the ellipsis ("我想…自杀的人都很痛苦吧"),
# nor clause punctuation: they part phrases, and the guards and
# exclusions read them ("以前会划手 现在已经一年没划了", "想死（不是）", "《红楼梦》里",
# "去“干掉”他").
_HAN = "\u3400-\u9fff"
_FILLER = char_class(
    {c for c in range(0x10000) if unicodedata.category(chr(c)) in ("So", "Sk", "Sm", "Pd", "Pc")}
    - {0x2014, 0x2015}  # the em dash (破折号) parts clauses: "我想——死亡是每个人都要面对的"
    | {ord(c) for c in "·•*~"}
    | set(range(0x1F000, 0x1FB00))
)
_BETWEEN_HAN = re.compile(f"(?<=[{_HAN}])[{_FILLER}]{{1,3}}(?=[{_HAN}])")


def forms_of(text: str) -> list[str]:
    """A normalized message, then (when they differ from it) in simplified characters, and
    that with what separates its Chinese characters removed: the lexicon's phrases are
    simplified and written solid. The classifier reads the message as written (it was trained
    so, and catches these forms by meaning)."""
    forms = [text]
    if text.isascii():
        return forms
    simplified = text.translate(_SIMPLIFIED)
    solid = _BETWEEN_HAN.sub("", simplified)
    for form in (simplified, solid):
        if form not in forms:
            forms.append(form)
    return forms


# a sentence in which the model refuses ("I won't tell you how many pills would be lethal") or
# warns ("安眠药和酒一起吃，这是非常危险的"): a method word there is no method detail
_REFUSAL = re.compile(
    r"\bi\s*(?:won'?t|will\s+not|can'?t|cannot|refuse\s+to|(?:'m|\s+am)\s+not\s+(?:going|able)\s+to)"
    r"\s+(?:tell|give|help|share|say|answer|provide|confirm|explain|list|describe)\b"
    r"|我(?:不会|不能|不想|没法|无法|拒绝)(?:告诉|帮|给|提供|说|回答|教)",
    re.IGNORECASE,
)
_BUT = re.compile(r"\b(?:but|however|though|although|yet)\b|但|不过|可是", re.IGNORECASE)
_WARNING = re.compile(
    r"(?<!not )(?<!n't )(?<!nothing )(?<!never )\b(?:dangerous|unsafe|harmful)\b"
    r"|(?<![不没])危险|不安全",
    re.IGNORECASE,
)
# a warning conceded ("虽然很危险，最快的方法是跳楼", "even if it's unsafe", "我知道这很危险")
_CONCEDE = re.compile(
    r"\b(?:although|though|even\s+(?:though|if)|despite)\b|\bi\s+know\s+(?:it|that|this)(?:'s|\s+is)?\b"
    r"|虽然|尽管|即使|虽说|我知道(?:这|那|它)|明知",
    re.I,
)
_CLAUSE_BREAK = re.compile(r"[,，;；:：()（）、]")
# what parts a warning said before a method from it ("This is dangerous: cut along ...",
# "注意，这不安全——...", "Warning, this is harmful - mix ..."); a comma does not ("That's
# dangerous, taking 40 of your pills with vodka could kill you" warns of the method)
_WARNING_BREAK = re.compile(r"[:：—–]|\s-+\s")
# a negation of the act just before an English method ("Never leave your car engine running in
# a closed garage"): its verb, then at most three words, no clause break ("don't forget to
# take ..." is no negation of taking)
_NEGATED = re.compile(
    r"\b(?:never|don'?t|do\s+not)\s+(?:ever\s+)?(?:leave|run|take|mix|use|try|put|keep|drink"
    r"|swallow|combine|stand|drive|let|close|seal|warm|start|idle)\b(?:\s+\w+){0,3}\s+$",
    re.IGNORECASE,
)


def match_reply(lex: Lexicon, text: str) -> list[str]:
    """The categories whose `reply_patterns` find method details in a normalized model reply:
    a hit counts unless its sentence refuses before it ("I won't tell you ...", with no "but" or
    clause break between) or warns (_warns)."""
    return sorted(c for c, rules in lex.reply.items() if any(_reply_hit(r, text) for r in rules))


def _reply_hit(rule: re.Pattern[str], text: str) -> bool:
    """Whether a hit of the rule counts. A refusal about something else ("I can't tell you how
    sorry I am, take 40 of your pills with vodka") or a warning taken back ("..., it's unsafe
    but it works.") cleared method details."""
    for m in rule.finditer(text):
        start = max((e.end() for e in _SENTENCE_END.finditer(text, 0, m.start())), default=0)
        end = _SENTENCE_END.search(text, m.end())
        sentence = text[start : end.start() if end else len(text)]
        refusals = list(_REFUSAL.finditer(text, start, m.start()))
        # the last refusal before the hit, with no "but" or clause break after it ("I can't stop
        # you, but ...")
        refused = bool(refusals) and not (
            _BUT.search(text, refusals[-1].end(), m.start())
            or _CLAUSE_BREAK.search(text, refusals[-1].end(), m.start())
        )
        negated = _NEGATED.search(text, start, m.start()) is not None
        if not (refused or negated or _warns(sentence, m.start() - start)):
            return True
    return False


def _warns(sentence: str, hit: int) -> bool:
    """A warning word in the sentence ("dangerous", not negated) that is not conceded before it
    ("虽然很危险"), taken back after it ("unsafe but it works") or said in brackets ("it will
    work (this is harmful)"); before the hit (at `hit`), only in its clause: a warning said first
    and parted from the method ("这样做很危险：顺着血管竖着割") is a preface, not a refusal."""
    for w in _WARNING.finditer(sentence):
        before, after = sentence[: w.start()], sentence[w.end() :]
        bracketed = max(before.rfind("("), before.rfind("（")) > max(
            before.rfind(")"), before.rfind("）")
        )
        parted = w.end() <= hit and _WARNING_BREAK.search(sentence, w.end(), hit)
        if not (bracketed or parted or _CONCEDE.search(before) or _BUT.search(after)):
            return True
    return False


def blank_idioms(lex: Lexicon, text: str) -> str:
    """The text with every `exclude` match (idioms that borrow crisis words: 累死了, 想死你了,
    "this exam is killing me") replaced by a space: what the lexicon's phrases and patterns
    match (the `intent` phrases, matched on the message as written, keep "我想死你们都别管我"
    flagged)."""
    for pattern in lex.exclude:
        text = pattern.sub(" ", text)
    return text


def classifier_text(lex: Lexicon, norm: str) -> str:
    """What the classifier reads of a normalized message, in training and serving alike: the
    idioms blanked as for the lexicon (an idiom the list names is no evidence of crisis for
    either), whitespace collapsed again, so the text stays normalized."""
    return " ".join(blank_idioms(lex, norm).split())


def _hits(lex: Lexicon, category: str, rules: tuple[re.Pattern[str], ...], text: str) -> bool:
    """Whether any rule has a hit in `text` that no guard clears. A rule with more than
    MAX_GUARDED hits, all cleared, flags anyway: bounded time on long, repetitive text."""
    if category in UNGUARDED or not lex.guards:
        return any(rule.search(text) for rule in rules)
    starts: list[int] | None = None
    for rule in rules:
        for n, m in enumerate(rule.finditer(text)):
            if starts is None:  # where sentences start, found once per text
                starts = [0] + [e.end() for e in _SENTENCE_END.finditer(text)]
            if n >= MAX_GUARDED or not _cleared(lex, text, m, starts):
                return True
    return False


def _cleared(lex: Lexicon, text: str, m: re.Match[str], starts: list[int]) -> bool:
    """Whether a guard clears this hit, judged on its sentence (at most CONTEXT characters
    either side). A third party's frame (`others`) never clears a hit the writer is in: one
    that names them, or a sentence whose words before the hit have them as subject."""
    start = max(starts[bisect.bisect_right(starts, m.start()) - 1], m.start() - CONTEXT)
    end = _SENTENCE_END.search(text, m.end(), m.end() + CONTEXT)
    before = text[start : m.start()]
    after = text[m.end() : end.start() if end else min(len(text), m.end() + CONTEXT)]
    writer = _WRITER.search(m.group()) is not None or _SUBJECT.search(before) is not None
    return any(
        (g.before is None or g.before.search(before))
        and (g.after is None or g.after.search(after))
        and (g.hit is None or g.hit.search(m.group()))
        and not (g.others and writer)
        for g in lex.guards
    )
