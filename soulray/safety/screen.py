"""The crisis screen as serving uses it: every user message of a request, and the model's reply.

A message is flagged for a category when the lexicon matches (score 1.0: a high-precision
override) or the classifier's score for it reaches that category's threshold (chosen by train.py
on out-of-fold scores; serve.safety.thresholds overrides). The classifier reads each message's
last `max_chars` characters, the lexicon its last LEXICON_SPAN x max_chars (the model's reply
whole, in overlapping windows of `max_chars`), and its
result is cached by content hash, so a conversation resent turn after turn costs one classifier
call per new message. The result names the help lines for the flagged categories in the person's
language (a Chinese locale when the flagged text is Chinese: zh-CN, or zh-Hant in Traditional
characters, with Taiwan's and Hong Kong's lines, or zh-HK in Cantonese; Japanese, with its kana,
is not Chinese).

This is a screen, not a clinical instrument: it errs towards flagging, and its measured recall and
false-positive rates are in bench/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from soulray.config import HelpLine, SafetyConfig
from soulray.safety.classifier import CATEGORIES, Classifier, load_weights
from soulray.safety.features import format_variants
from soulray.safety.lexicon import (
    Lexicon,
    build_lexicon,
    classifier_text,
    forms_of,
    load_builtin,
    match,
    match_reply,
)
from soulray.safety.reply import ReplyWeights, load_reply_weights
from soulray.safety.weight import underweight_wish
from soulray.text import CJK

log = logging.getLogger("soulray.safety")

CACHE_SIZE = 4096
# The lexicon reads a message's last LEXICON_SPAN x max_chars characters (2,000 by default), the
# classifier its last max_chars: a crisis said first in a long message ("I have the pills saved
# up and I'm taking them all tonight. Sorry, that's blunt. Let me explain ...") was never seen.
# The lexicon costs ~1 ms per 100 characters on one thread, the embedding ~1 ms per token.
LEXICON_SPAN = 5
# Japanese writes kanji too: kana says a text is not Chinese, when it is a good share of the
# words (kana letters; not the long-vowel mark and iteration marks that kaomoji draw with,
# "ヽ(ー_ー)ノ"). A Chinese message with a kaomoji or the borrowed "の" ("我想死の心都有了") is
# Chinese; Japanese is rarely under a third kana ("死にたい", "もう生きるのが辛い").
_KANA = re.compile(r"[\u3041-\u3096\u30a1-\u30fa]")
KANA_SHARE = 0.25
# auto's locales for Chinese text (help lines in data/helplines.json; chinese_locale picks one),
# each with the others to fall back on, in order, where the config lacks it: Hong Kong said, or
# Cantonese not in Simplified characters (Hong Kong's lines); Taiwan said (Taiwan's); Traditional
# characters (Taiwan's and Hong Kong's: a message does not say which); Simplified
CHINESE_LOCALES = {
    "zh-HK": ("zh-HK", "zh-Hant", "zh-TW", "zh-CN"),
    "zh-TW": ("zh-TW", "zh-Hant", "zh-HK", "zh-CN"),
    "zh-Hant": ("zh-Hant", "zh-TW", "zh-HK", "zh-CN"),
    "zh-CN": ("zh-CN", "zh-Hant", "zh-TW", "zh-HK"),
}
# written Cantonese's own characters (not 係 or 俾, which standard Chinese writes too), and 唔
# before a verb (唔想, 唔知: Mandarin writes 唔 alone, as "hmm": "唔，我真的不想活了")
_CANTONESE = re.compile(
    "[嘅咗佢冇喺嘢啲哋嚟攰瞓嗰噉搵揾畀]|唔(?=[想係系知好使會会可要去做得識识該该理明])"
)
# a place the person says they are in or from ("我在台北", "我喺香港", "我是台湾人"), not a word
# holding its name (阳台中, 新界面, 九龙坡) nor a place they are going to
_WHERE = "(?:在|喺|住|人在|身在|來自|来自|嚟自|是|係|系|回到|返咗|搬到|搬咗去)"
_SOMEONE = re.compile(
    "他|她|佢|男朋友|女朋友|老公|老婆|朋友|妈|媽|爸|家人|同事|同学|同學|哥|姐|弟|妹|孩子|仔|囡"
)
_PLACES = {
    "zh-HK": re.compile(
        f"{_WHERE}(?:香港|九龍(?!坡)|九龙(?!坡)|新界(?!面)|港島|港岛|旺角|銅鑼灣|铜锣湾|沙田|屯門|屯门|元朗)"
        "|(?:香港)(?=人)"
    ),
    "zh-TW": re.compile(
        f"{_WHERE}(?:台灣|台湾|臺灣|台北|臺北|台中|臺中|台南|臺南|高雄|新竹|桃園|桃园)"
        "|(?:台灣|台湾|臺灣)(?=人)"
    ),
}
# Cantonese writes these in Hong Kong too ("食晒", "嚇親" as "吓亲"): no sign of Simplified script
_BOTH_SCRIPTS = frozenset("晒吓揾")
LOCALE_TURNS = 3  # the user messages a replaced reply's language is read from
NUMBER_TURNS = 3  # the user messages a height, a weight and a wish to lose more are read across
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_LINK = re.compile(r"https?://\S+|www\.\S+", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the screen found; serve's SafetyInfo is built from it."""

    flagged: bool = False
    categories: tuple[str, ...] = ()
    category: str | None = None  # the flagged category with the highest score
    score: float | None = None  # that score (1.0 when the lexicon matched)
    locale: str | None = None
    resources: tuple[HelpLine, ...] = ()


@dataclass(slots=True)
class Screen:
    """Built once per ingress replica: lexicon, classifier, help lines, and a result cache."""

    cfg: SafetyConfig
    lexicon: Lexicon
    classifier: Classifier | None
    thresholds: np.ndarray
    resources: dict[str, list[HelpLine]]
    fixed_reply: dict[str, str]
    header: dict[str, str]
    chinese: tuple[str, ...] = ()  # the Chinese locales auto picks from (CHINESE_LOCALES')
    cache: OrderedDict[bytes, np.ndarray] = field(default_factory=OrderedDict)


def build_screen(cfg: SafetyConfig) -> Screen:
    lex, lines = load_builtin(), _helplines()
    resources_ = cfg.resources if cfg.resources is not None else lines["resources"]
    replies = cfg.fixed_reply if cfg.fixed_reply is not None else lines["fixed_reply"]
    headers = {**lines["header"], **(cfg.header or {})}
    # the locales a request can get: auto picks one of CHINESE_LOCALES for Chinese text (zh-CN
    # when it has help lines; the others when they have a fixed reply too, else a fallback),
    # else default_locale; a fixed locale is every request's (default_locale goes unused)
    chinese = tuple(
        loc for loc in CHINESE_LOCALES if loc in resources_ and (loc == "zh-CN" or loc in replies)
    )
    auto = [cfg.default_locale, *chinese]
    reached = set(auto if cfg.locale == "auto" else [cfg.locale])
    for locale in reached:
        if locale not in resources_ or locale not in replies:
            raise ValueError(
                f"serve.safety has no resources or fixed_reply for locale {locale!r}; add it to "
                f"serve.safety.resources and serve.safety.fixed_reply (known: {sorted(resources_)})"
            )
        covered = {c for h in resources_[locale] for c in h.categories or CATEGORIES}
        missing = [c for c in CATEGORIES if c not in covered]
        if missing:
            # Refused, not filled in from another locale: its lines are another country's
            # numbers, in another language; only the operator knows which line serves here.
            raise ValueError(
                f"serve.safety.resources has no help line for {', '.join(missing)} in locale "
                f"{locale!r}: a person flagged for them would get the header alone; add lines "
                "with those categories, or a line with no categories (shown for every category)"
            )
        lang = locale.split("-")[0]
        language = [h for loc, h in sorted(headers.items()) if loc.split("-")[0] == lang]
        if locale not in headers and language:
            headers[locale] = language[0]  # en-GB: en-US's
        elif locale not in headers:
            raise ValueError(
                f"serve.safety has no header for locale {locale!r} (the line above its help "
                f"lines, in its language); add it to serve.safety.header"
            )
    head = load_reply_weights() if cfg.reply_head else None
    classifier = Classifier(load_weights(), head) if cfg.classifier else None
    _describe(cfg, reached, resources_, replies, head)
    return Screen(
        cfg,
        build_lexicon(
            cfg.intent if cfg.intent is not None else lex["intent"],
            cfg.lexicon if cfg.lexicon is not None else lex["lexicon"],
            cfg.patterns if cfg.patterns is not None else lex["patterns"],
            cfg.exclude if cfg.exclude is not None else lex["exclude"],
            cfg.guard if cfg.guard is not None else lex["guard"],
            cfg.reply_patterns if cfg.reply_patterns is not None else lex["reply_patterns"],
        ),
        classifier,
        category_thresholds(cfg, classifier),
        resources_,
        replies,
        headers,
        chinese,
    )


def _describe(
    cfg: SafetyConfig,
    reached: set[str],
    resources_: dict[str, list[HelpLine]],
    replies: dict[str, str],
    head: ReplyWeights | None,
) -> None:
    """Log what the screen will do, and warn of settings that do nothing or not what they
    seem to: locales no request gets (a typo of one, say), Chinese messages answered with
    another locale's help lines, a crisis threshold the other one caps."""
    if not cfg.enabled:
        log.warning(
            "serve.safety.enabled is false: no crisis screen (no help lines, no reply screen)"
        )
        return
    for key, given in (("resources", cfg.resources), ("fixed_reply", cfg.fixed_reply)):
        # under auto, a Chinese locale one of the two lacks is warned of below
        unreached = (
            set(given or {}) - reached - (set(CHINESE_LOCALES) if cfg.locale == "auto" else set())
        )
        for locale in sorted(unreached):
            log.warning(
                "serve.safety.%s.%s: no request gets locale %r (they get %s); a typo?",
                key,
                locale,
                locale,
                " or ".join(sorted(reached)),
            )
    for locale in sorted(set(cfg.header or {}) - reached):
        log.warning("serve.safety.header.%s: no request gets locale %r; a typo?", locale, locale)
    for locale in [loc for loc in CHINESE_LOCALES if loc != "zh-CN"]:
        if cfg.locale == "auto" and (locale in resources_) != (locale in replies):
            has, lacks = ("resources", "fixed_reply")[:: 1 if locale in resources_ else -1]
            configured = cfg.resources if has == "resources" else cfg.fixed_reply
            log.warning(
                "serve.safety.%s has no %s, which the %s serve.safety.%s has: the messages it is "
                "for get %s's help lines and fixed reply (add %s to serve.safety.%s)",
                lacks,
                locale,
                "configured" if configured is not None else "built-in",
                has,
                chinese_fallback(locale, tuple(sorted(reached))) or cfg.default_locale,
                locale,
                lacks,
            )
    if cfg.locale == "auto" and "zh-CN" not in resources_:
        instead = chinese_fallback("zh-CN", tuple(reached))  # another Chinese locale's, or none
        log.warning(
            "serve.safety.resources has no zh-CN: a person writing in %s gets the %s help "
            "lines and fixed reply (add zh-CN lines, or set serve.safety.locale)",
            "Simplified Chinese" if instead else "Chinese",
            instead or cfg.default_locale,
        )
    calm = cfg.reply_head_threshold or (head.threshold if head else None)
    flagged = cfg.reply_head_threshold_flagged
    if head is not None and calm is not None and flagged is not None and flagged > calm:
        log.warning(
            "serve.safety.reply_head_threshold_flagged=%s is above the reply head's threshold "
            "%.3f: the lower applies after a crisis message",
            flagged,
            calm,
        )
    lines = ", ".join(f"{loc} {len(resources_[loc])}" for loc in sorted(reached))
    log.info(
        "crisis screen: classifier %s, reply screen %s, mode %s; help lines per locale: %s; "
        "thresholds %s",
        "on" if cfg.classifier else "off (the lexicon alone)",
        "on" if cfg.screen_reply else "off",
        cfg.mode,
        lines,
        cfg.thresholds or "as trained",
    )


def _scripts() -> tuple[frozenset[str], frozenset[str]]:
    text = resources.files("soulray.safety").joinpath("data/scripts.json").read_text("utf-8")
    data = json.loads(text)
    return frozenset(data["traditional_only"]), frozenset(data["simplified_only"])


_TRADITIONAL_ONLY, _SIMPLIFIED_ONLY = _scripts()


def _helplines() -> dict:
    text = resources.files("soulray.safety").joinpath("data/helplines.json").read_text("utf-8")
    data = json.loads(text)
    data["resources"] = {
        loc: [HelpLine(**h) for h in lines] for loc, lines in data["resources"].items()
    }
    return data


def category_thresholds(cfg: SafetyConfig, classifier: Classifier | None) -> np.ndarray:
    """Each category's threshold, at most 1.0: a lexicon match scores 1.0 and must flag even
    where serve.safety.thresholds sets one above 1 (to leave that category to the lexicon)."""
    shipped = classifier.w.thresholds if classifier else np.ones(len(CATEGORIES), np.float32)
    chosen = dict(zip(CATEGORIES, shipped.tolist(), strict=True))
    chosen.update(cfg.thresholds or {})
    return np.minimum([chosen[c] for c in CATEGORIES], 1.0)


def classifier_decides(cfg: SafetyConfig) -> np.ndarray:
    """(C,) bool: the categories the classifier may flag, all but those serve.safety.thresholds
    sets above 1 (left to the lexicon)."""
    above = {c for c, t in (cfg.thresholds or {}).items() if t > 1}
    return np.array([c not in above for c in CATEGORIES])


def scores(screen: Screen, text: str, vote: bool = True) -> np.ndarray:
    """Per-category scores of one message: the classifier's, raised to 1.0 where the lexicon
    matches. `vote`: with the training messages' vote, or without it (as a model's reply is
    scored, reply_window_scores: its nearest training messages are people's, and a kind reply
    that names suicide sits among them)."""
    return score_pair(screen, text)[0 if vote else 1]


def score_pair(screen: Screen, text: str) -> np.ndarray:
    """(2, C): a message's scores with the vote and without it (Classifier.both), each raised
    to 1.0 where the lexicon matches. Cached by the hash of the screened text (never the text
    itself)."""
    chars = screen.cfg.max_chars * LEXICON_SPAN
    return _cached(screen, "message", text, _message_pair, chars=chars)


def _message_pair(screen: Screen, norm: str) -> np.ndarray:
    """The classifier reads the message's last max_chars (and, with head_window, embeds its
    start too: Classifier.both), the lexicon its last LEXICON_SPAN times that (`norm`)."""
    out = np.zeros((2, len(CATEGORIES)))
    if screen.classifier:  # it reads the message without the idioms, as it was trained
        tail = norm[-screen.cfg.max_chars :]  # = normalize(text, max_chars)
        read = classifier_text(screen.lexicon, tail)
        # the message's start: of what the lexicon reads (a crisis said first in a message
        # longer than max_chars is outside `tail`), as much as the embedding's window can hold
        start = None
        if screen.cfg.head_window:
            start = (
                read
                if len(norm) <= len(tail)
                else classifier_text(screen.lexicon, norm[: len(tail)])
            )
        out = np.maximum(out, screen.classifier.both(read, start, screen.cfg.head_window))
    for c in match(screen.lexicon, norm):  # the config admits only CATEGORIES
        out[:, CATEGORIES.index(c)] = 1.0
    return out


def reply_window_scores(screen: Screen, text: str, flagged_user: bool = False) -> np.ndarray:
    """(C,): one window of a model reply: the classifier's scores without the vote, raised to
    1.0 where the reply head (reply.py) or the lexicon's reply_patterns find method details (the
    head's flag goes to the category the classifier scores highest, and is dropped when
    serve.safety.thresholds leaves that category to the lexicon). The head's threshold is lower
    when the person is in crisis (`flagged_user`: reply_head_threshold_flagged), where a reply
    like "Do it tonight." is the worst there is and replacing a kind one costs least: the help
    lines are shown already. The lists for people's messages are not matched: their
    first-person phrases, in a counselor's reflection ("是什么让你想伤害自己") or refusal ("I'm not
    going to tell you the lethal dose"), replaced kind replies."""
    head = screen.classifier.reply_w if screen.classifier else None
    threshold = 1.0
    if head is not None:
        threshold = screen.cfg.reply_head_threshold or head.threshold
        if flagged_user:  # never looser than without a crisis
            lower = screen.cfg.reply_head_threshold_flagged or head.threshold_flagged or 1.0
            threshold = min(threshold, lower)
    outs = []
    # a window is cut from the reply as written (reply_scores), and screened whole: NFKC
    # lengthens some text ("…" is "..."), and a second cut to max_chars would drop its start
    parts = _cached(screen, "reply", text, _reply_parts, reduce=False, whole=True)
    for found, method, lexicon in parts:
        out = found.copy()
        top = int(np.argmax(found))  # method details, of what the reply is about
        if head is not None and method[0] >= threshold and classifier_decides(screen.cfg)[top]:
            out[top] = 1.0
        outs.append(np.maximum(out, lexicon))
    return np.max(outs, axis=0)


def _reply_parts(screen: Screen, norm: str) -> np.ndarray:
    """(3, C) for one normalized reply window: the classifier's scores without the vote; the
    reply head's score (in the first column; 0 without the head); 1.0 where reply_patterns
    match."""
    out = np.zeros((3, len(CATEGORIES)))
    if screen.classifier:
        found, method = screen.classifier.reply(classifier_text(screen.lexicon, norm))
        out[0], out[1, 0] = found, method
    for c in match_reply(screen.lexicon, norm):
        out[2, CATEGORIES.index(c)] = 1.0
    return out


def _cached(
    screen: Screen,
    kind: str,
    text: str,
    compute: Callable[[Screen, str], np.ndarray],
    reduce: bool = True,
    whole: bool = False,
    chars: int | None = None,
) -> np.ndarray:
    """compute(screen, normalized text) for each of the text's format variants (each its last
    `chars` normalized characters (default max_chars), or `whole`), cached by the hash of `kind`
    and the screened text (never the text itself): the highest over the variants, or
    (`reduce=False`) one row per variant."""
    # one variant, unless the text hides characters
    variants = format_variants(text, None if whole else chars or screen.cfg.max_chars)
    # JSON: a text holding the separator must not spell another list of variants
    spelt = json.dumps([kind, *variants], ensure_ascii=False)
    key = hashlib.blake2b(spelt.encode("utf-8"), digest_size=16).digest()
    hit = screen.cache.get(key)
    if hit is None:
        hit = np.stack([compute(screen, norm) for norm in variants])
        screen.cache[key] = hit
        if len(screen.cache) > CACHE_SIZE:
            screen.cache.popitem(last=False)
    else:
        screen.cache.move_to_end(key)
    return hit.max(axis=0) if reduce else hit


def assess(screen: Screen, texts: list[str]) -> Assessment:
    """Screen user messages (all of them, or the last serve.safety.scan_user_turns)."""
    if not screen.cfg.enabled or not texts:
        return Assessment()
    window = texts[-screen.cfg.scan_user_turns :] if screen.cfg.scan_user_turns else texts
    pairs = [score_pair(screen, t) for t in window]
    if _numbers_across(screen, window):
        pairs[-1] = np.maximum(pairs[-1], np.eye(len(CATEGORIES))[CATEGORIES.index("self_harm")])
    flagged = [i for i, p in enumerate(pairs) if (p[0] >= screen.thresholds).any()]
    if not flagged:
        return Assessment()
    best, own = np.max([pairs[i] for i in flagged], axis=0)
    # The vote decides that a message is crisis, not which kind (it moves every category alike):
    # the categories are the highest-scored one, and those the classifier names without the vote.
    top = CATEGORIES[int(np.argmax(np.where(best >= screen.thresholds, best, -1.0)))]
    cats = tuple(c for i, c in enumerate(CATEGORIES) if c == top or own[i] >= screen.thresholds[i])
    context = [t for i, t in enumerate(window) if i not in flagged]
    locale = pick_locale(screen, [window[i] for i in flagged], context)
    return Assessment(
        True,
        cats,
        top,
        round(float(best[CATEGORIES.index(top)]), 4),
        locale,
        tuple(lines_for(screen, locale, cats)),
    )


def _numbers_across(screen: Screen, window: list[str]) -> bool:
    """Starving oneself said in numbers across the person's last few messages ("I'm 5'4 and 90
    lbs", "and I need to lose more"): the lexicon reads weight.py's rule one message at a time."""
    if len(window) < 2:
        return False
    chars = screen.cfg.max_chars * LEXICON_SPAN
    joined = "\n".join(format_variants(t, chars)[0] for t in window[-NUMBER_TURNS:])
    return any(underweight_wish(form) for form in forms_of(joined))


def pick_locale(screen: Screen, texts: list[str], context: list[str] | None = None) -> str:
    """A Chinese locale when any of the texts is Chinese (chinese_locale of them and of the
    `context`, the request's other user messages: one may say where the person is, or write
    Traditional characters the flagged one does not; or the first of its fallbacks the screen
    has), else the default locale."""
    if screen.cfg.locale != "auto":
        return screen.cfg.locale
    if any(_is_chinese(t) for t in texts):
        want = chinese_locale("\n".join([*(context or []), *texts]))
        return chinese_fallback(want, screen.chinese) or screen.cfg.default_locale
    return screen.cfg.default_locale


def chinese_locale(text: str) -> str:
    """The place a Chinese text's help lines are for: a place it names (Hong Kong: zh-HK;
    Taiwan: zh-TW); else zh-HK for Cantonese (嘅 咗 唔 佢 ...) not in Simplified characters;
    zh-Hant for Traditional characters (more of those only Traditional writes than of those only
    Simplified does: 我想自殺, not 我想自杀); else zh-CN (a short message of characters both
    scripts write, 我不想活了, says nothing; Cantonese in Simplified characters is Guangdong's)."""
    named = [
        loc for loc, place in _PLACES.items() if any(_own(text, m) for m in place.finditer(text))
    ]
    if len(named) == 1:
        return named[0]
    traditional = sum(c in _TRADITIONAL_ONLY for c in text)
    simplified = sum(c in _SIMPLIFIED_ONLY and c not in _BOTH_SCRIPTS for c in text)
    if _CANTONESE.search(text) and traditional >= simplified:
        return "zh-HK"
    return "zh-Hant" if traditional > simplified else "zh-CN"


def _own(text: str, m: re.Match[str]) -> bool:
    """Whether a place is the writer's: its clause names no one else before it, or the writer
    after them ("我男朋友在台湾出差" is not; "我妈说我在香港" is)."""
    clause = re.split("[，,。！？!?\n；;]", text[: m.start()])[-1]
    other = max((o.end() for o in _SOMEONE.finditer(clause)), default=-1)
    return clause.rfind("我") >= other


def chinese_fallback(locale: str, available: tuple[str, ...]) -> str | None:
    """`locale`, or the first of its fallbacks (CHINESE_LOCALES) that is available: another
    Chinese locale's lines before the default locale's (zh-HK: zh-Hant, whose lines are Taiwan's
    and Hong Kong's, then zh-TW, then zh-CN)."""
    return next((c for c in CHINESE_LOCALES[locale] if c in available), None)


def _is_chinese(text: str) -> bool:
    """Chinese when its Han characters are at least as many as its Latin words (a name or a word
    of Chinese in an English message, "my boyfriend 李伟 choked me", is English; emoji,
    punctuation, digits and links count for neither: "想死😭😭😭😭😭" is Chinese), and not
    Japanese (kana a quarter of the CJK letters or more)."""
    han, kana = len(CJK.findall(text)), len(_KANA.findall(text))
    words = len(_LATIN_WORD.findall(_LINK.sub(" ", text)))
    return han > 0 and han >= words and kana < KANA_SHARE * (han + kana)


def lines_for(screen: Screen, locale: str, categories: tuple[str, ...]) -> list[HelpLine]:
    """The locale's help lines for these categories (a line with no categories is for all)."""
    return [
        h
        for h in screen.resources[locale]
        if not h.categories or set(h.categories) & set(categories)
    ]


def format_resources(screen: Screen, a: Assessment) -> str:
    """The help lines as text, with the locale's header."""
    header = screen.header.get(a.locale or "", screen.header["en-US"])
    lines = [f"- {r.name}: {r.contact}" + (f" ({r.note})" if r.note else "") for r in a.resources]
    return "\n".join([header, *lines])


def fixed_reply(screen: Screen, a: Assessment, help_lines: bool = True) -> str:
    """The fixed safe reply with the help lines (without them: where they were shown already)."""
    locale = a.locale or screen.cfg.default_locale
    if not help_lines:
        return screen.fixed_reply[locale]
    return f"{screen.fixed_reply[locale]}\n\n{format_resources(screen, a)}"


def reply_scores(screen: Screen, reply: str, flagged_user: bool = False) -> np.ndarray:
    """A reply is screened whole, in windows of max_chars every max_chars/2 characters from its
    start (a sentence cut by one window is whole in the next), taking each category's highest
    score: method details early in a long reply must not slip past a screen that sees only the
    tail. The windows start at fixed offsets, so while a reply streams and is screened again
    sentence by sentence, its earlier windows come from the cache."""
    n = screen.cfg.max_chars
    starts = range(0, max(len(reply) - n, 0) + n // 2, n // 2)
    windows = [reply_window_scores(screen, reply[i : i + n], flagged_user) for i in starts]
    return np.max(windows, axis=0)


def check_reply(screen: Screen, reply: str, user: Assessment, user_texts: list[str]) -> Assessment:
    """The model's reply screened like a message; flagged = it must be replaced. The returned
    assessment names the reply's own categories (what the replaced-reply counter counts) and
    carries the help lines to show: the user's, in the user's language, when the user was
    flagged (what the person said is what they need help with)."""
    if not (screen.cfg.enabled and screen.cfg.screen_reply) or not reply.strip():
        return Assessment()
    s = reply_scores(screen, reply, user.flagged)
    # stricter than for messages: a reply pattern's match (1.0) or a confident score; a model's
    # own text (or a tiny test model's gibberish) must not lose the conversation on a weak score
    hits = s >= np.maximum(screen.thresholds, screen.cfg.reply_threshold)
    if not hits.any():
        return Assessment()
    cats = tuple(c for c, h in zip(CATEGORIES, hits, strict=True) if h)
    top = max(cats, key=lambda c: s[CATEGORIES.index(c)])
    if user.flagged:
        locale, lines = user.locale, user.resources
    else:
        # the person's last few messages: a last "ok", "？？" or emoji says no language
        locale = pick_locale(
            screen, ["\n".join(user_texts[-LOCALE_TURNS:])] if user_texts else [reply]
        )
        lines = tuple(lines_for(screen, locale, cats))
    return Assessment(True, cats, top, round(float(s[CATEGORIES.index(top)]), 4), locale, lines)
