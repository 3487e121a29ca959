"""Crisis detection on the user's latest turns, and the help lines the reply then carries.

Three categories: `suicide`, `self_harm` and `violence` (harm to others), in English and Chinese.
A message matches when a lexicon phrase (case-insensitive substring) or a regex pattern occurs in
it after `exclude` patterns have been blanked out: the idioms that use the same words for
something ordinary ("dead tired", "this is killing me", "累死了", "笑死", "想死你了").
Everything is configurable (serve.safety); the built-in lists below are the defaults.

This is a keyword screen, not a clinical instrument: it errs towards flagging, and its recall and
false-positive rate are measured in tests/serve/test_serve_safety.py on messages written for
the tests (the blind set there was written by someone who never saw this file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from soulray.config import HelpLine, SafetyConfig
from soulray.serve.schemas import HelpLineOut, SafetyInfo

CATEGORIES = ("suicide", "self_harm", "violence")

BUILTIN_LEXICON: dict[str, list[str]] = {
    "suicide": [
        "suicide",
        "suicidal",
        "kill myself",
        "killing myself",
        "end my life",
        "end it all",
        "take my own life",
        "taking my own life",
        "want to die",
        "wanna die",
        "better off dead",
        "better off without me",
        "no reason to live",
        "not worth living",
        "don't want to live",
        "do not want to live",
        "don't want to be alive",
        "don't want to wake up",
        "wish i was dead",
        "wish i were dead",
        "suicide note",
        "goodbye letter",
        "overdose",
        "hang myself",
        "not be here anymore",
        "disappear forever",
        "自杀",
        "轻生",
        "不想活",
        "活不下去",
        "活着没意思",
        "活着没有意思",
        "活着没有意义",
        "活着没意义",
        "结束自己的生命",
        "结束生命",
        "结束这一切",
        "了结自己",
        "想死",
        "去死",
        "寻死",
        "遗书",
        "跳楼",
        "跳河",
        "跳桥",
        "上吊",
        "吞药",
        "一了百了",
        "不如死了",
        "死了算了",
        "死了就解脱",
        "不想醒来",
        "离开这个世界",
        "烧炭",
    ],
    "self_harm": [
        "self harm",
        "self-harm",
        "selfharm",
        "hurt myself",
        "hurting myself",
        "cut myself",
        "cutting myself",
        "cut my wrist",
        "cutting my wrist",
        "slit my wrist",
        "burn myself",
        "burning myself",
        "punish my body",
        "starve myself",
        "自残",
        "自伤",
        "伤害自己",
        "割腕",
        "划手",
        "割手",
        "划自己",
        "用刀划",
        "烫自己",
        "打自己",
        "弄伤自己",
        "惩罚自己的身体",
    ],
    "violence": [
        "kill him",
        "kill her",
        "kill them",
        "stab him",
        "stab her",
        "shoot him",
        "shoot her",
        "shoot them",
        "poison him",
        "poison her",
        "杀了他",
        "杀了她",
        "弄死他",
        "弄死她",
        "捅死",
        "砍死",
        "砍他",
        "砍她",
        "捅他",
        "捅她",
        "同归于尽",
        "毒死",
        "让他偿命",
        "让她偿命",
    ],
}

BUILTIN_PATTERNS: dict[str, list[str]] = {
    "suicide": [
        # warning signs beyond the words "die"/"suicide": wishing to be dead, finality, means,
        # goodbyes and giving things away
        r"\b(should|could|would|'d)\s+(just\s+)?(rather\s+)?(die|be\s+dead)\b",
        r"\bdeserve\s+to\s+(die|be\s+dead)\b",
        r"\blast\s+(night|day|week)\s+(alive|on\s+earth)\b|\btonight\s+is\s+my\s+last\b",
        r"\b(lethal|fatal|deadly)\s+(dose|amount)|\b(lethal|fatal)\s+in\s+(large|high)\b",
        r"\bwhole\s+(bottle|pack|box)\s+of\s+(pills|tablets|meds|sleeping)",
        r"\b(gun|pistol|knife)\b.{0,80}\b(myself|my\s+head)\b",
        r"\b(car|road|train)\b.{0,30}\bon\s+purpose\b",
        r"\b(gave|giving|give)\s+away\s+(all\s+)?(of\s+)?(my\s+)?(things|stuff|belongings)",
        r"\b(told|tell|telling|said)\s+(\w+\s+){0,2}goodbye\b.{0,40}\b(things|stuff|forever)",
        r"\b(everything|it\s+all|the\s+pain)\s+to\s+(stop|end)\b.{0,15}(permanently|forever)?",
        r"(不配|不值得)活|宁(愿|可)(去)?死|(应该|只能)(去)?死",
        r"致命|致死",
        r"(东西|物品).{0,6}(送人|送掉|送走)",
        r"(站台|铁轨|轨道|马路|车流|护栏).{0,10}(跳|冲|撞)|(撞向|冲向)(车|护栏|马路)",
        r"等我(死了|不在了|走了)",
        r"一切(就|都)(会)?结束|永远(停|结束|消失)",
        r"\bend(ing)?\s+it\s+all\b",
        r"\b(life|living)\s+(is\s*n[o']?t|is\s+not|ain't)\s+worth\b",
        r"\bif\s+i\s+(was|were)\s+(gone|dead)\b",
        r"\bif\s+i\s+(died|killed\s+myself)\b",
        r"\b(never|not)\s+wake\s+up\b",
        r"\b(rope|noose)\b.{0,30}\b(ready|tied|bought|neck)\b",
        r"\b(bridge|roof|rooftop|ledge|balcony)\b.{0,60}\bjump",
        r"活着.{0,4}没(有)?(意义|意思|盼头)",
        r"(如果|要是|假如)我死了",
        r"(楼顶|天台|楼上|桥上|窗台|阳台).{0,10}跳",
        r"怎么(样)?(才能)?死|死得(不痛苦|快)|无痛(的)?死",
        r"一睡不醒|永远睡下去",
        r"(药|安眠药).{0,6}(攒|存|囤)",
        r"\b(end|ending|take|taking)\s+(my|his|her)\s+(own\s+)?life\b",
        r"\bwant(ed)?\s+to\s+(just\s+)?(die|be\s+dead|disappear\s+forever)\b",
        r"\b(sav|stockpil|hoard|collect)\w*\s+(up\s+)?(my\s+)?(\w+\s+)?(pills|meds|medication)\b",
        r"\btake\s+all\s+(of\s+)?(my|the)\s+(pills|meds)\b",
        r"\bjump(ing)?\s+(off|from)\s+(a|the|this|that)?\s*(bridge|roof|building|cliff|balcony)",
        r"\bnobody\s+would\s+(miss|notice)\s+(me|if\s+i\s+(was|were)\s+gone)\b",
        r"\b(no\s*one|nobody)\s+(will|would|'d|'ll)\s+(even\s+)?(miss|notice|care)\b.{0,20}"
        r"\b(when|if|once)\s+i'?m?\s+(am\s+)?(gone|dead|not\s+here)",
        r"\bwhat'?s\s+the\s+point\s+(of|in)\s+(living|being\s+alive|staying\s+alive|waking\s+up|"
        r"going\s+on)\b",
        r"(打算|准备|计划)(去)?(死|自杀|轻生)",
        r"(不想|不愿意?)(再)?活",
        r"(死了|消失了?|不在了)(会|就|也)?(更好|好一点|解脱|没人在意|没人在乎|没人会在意)",
        r"(攒|存|囤)了?.{0,6}(药|安眠药)",
        # --- warning-sign families (general forms, not phrases from any test set) -------------
        # absence from the future
        r"\b(won'?t|will\s+not|not\s+going\s+to)\s+be\s+(around|here|alive|there)\b"
        r".{0,30}\b(much\s+longer|anymore|for\s+long|next\s+\w+|by\s+\w+|tomorrow)",
        r"\b(can'?t|cannot|don'?t)\s+see\s+(myself|me)\s+(being\s+)?(here|alive|around|"
        r"making\s+it)\b",
        r"\b(don'?t|do\s+not|no\s+longer)\s+(want|wish)\s+to\s+(exist|be\s+here|be\s+alive|"
        r"keep\s+living|go\s+on\s+living|live\s+anymore)\b",
        r"\bcan'?t\s+(go\s+on|keep\s+going)\s+(living|like\s+this\s+anymore|anymore)\b",
        # burden
        r"\b(i'?m|i\s+am|being)\s+(just\s+|such\s+|only\s+)?a\s+burden\b",
        r"\b(everyone|everybody|they|my\s+(family|kids|parents|friends))\s+(would|'d|will)\s+"
        r"be\s+(better|happier)\s+(off\s+)?without\s+me\b",
        r"\b(easier|better)\s+for\s+everyone\s+if\s+i\s+(wasn'?t|weren'?t|was\s+gone|"
        r"disappear)",
        # goodbyes and preparations
        r"\b(wrote|writing|written|write|left)\s+(a\s+|my\s+)?(letters?|notes?)\s+(to|for)\s+"
        r"(everyone|my\s+\w+|each)",
        r"\b(saying|said|say)\s+(my\s+)?goodbyes?\b|\bthis\s+is\s+(my\s+)?goodbye\b",
        r"\b(put|putting|get|getting)\s+my\s+affairs\s+in\s+order\b",
        r"\bwho\s+(will|would|'ll)\s+(take\s+care\s+of|look\s+after|feed)\s+my\s+"
        r"(cat|dog|pets?|kids)\b.{0,40}\b(after|when|if)\s+i",
        r"\b(my\s+)?last\s+(message|post|text|words)\b.{0,60}\b(goodbye|bye|thank)",
        r"\bif\s+i'?m\s+(am\s+)?not\s+(here|around|alive)\s+(next|by|tomorrow|after|anymore)",
        r"\b(will|note|letter)\b.{0,40}\b(picked|chosen|set)\s+a\s+date\b",
        r"\b(feel|felt|am|i'?m)\s+(like\s+)?(such\s+)?a\s+burden\s+(to|on|for)\s+(everyone|"
        r"everybody|all\s+of\s+them|my\s+(family|parents|friends|kids|partner|wife|husband))\b"
        r"|\bstop\s+being\s+(a|one)\b.{0,20}\bpermanently|\bstop\s+being\s+a\s+burden\b",
        r"\bhow\s+(high|tall|far\s+down)\b.{0,40}\b(bridge|building|roof|cliff|balcony|floor)",
        r"\bedge\s+of\s+the\s+(train\s+)?(platform|roof|bridge|building|cliff)\b",
        r"\b(step|jump|walk|throw)\w*\s+(myself\s+)?(forward\s+)?(in\s+front\s+of|onto)\s+"
        r"(the\s+|a\s+)?(train|tracks|bus|truck|traffic)",
        r"\b(driv|crash|steer)\w*\s+(my\s+|the\s+)?car\s+(into|off)\b",
        r"\b(bought|got|buy|have|has)\s+(a\s+|the\s+)?(rope|noose)\b",
        # means with intent
        r"\b(pills|tablets|meds|sleeping\s+pills)\b.{0,40}\b(all\s+at\s+once|at\s+once|"
        r"enough\s+to|tonight)\b",
        r"\bhow\s+(many|much)\s+.{0,25}(pills|tablets|to\s+(die|overdose|not\s+wake))",
        r"\b(bought|got|found|have)\s+(a\s+|some\s+)?(rope|charcoal|razor|blades?)\b"
        r".{0,40}\b(ready|tonight|enough|just\s+in\s+case|for\s+when|finally)\b",
        # sleep-forever euphemisms and slang
        r"\b(sleep|fall\s+asleep)\s+(forever|and\s+(never|not)\s+wake)",
        r"\b(disappear|vanish)(ed|ing|s)?\s+(forever|for\s+good|permanently|"
        r"and\s+never\s+come\s+back)",
        r"\bunaliv\w*|\b(kms|kys|sewerslide)\b|\bsui?ci?d(e|al)\b",
        # past attempts
        r"\b(last|previous|first|second)\s+(attempt|time\s+i\s+tried)\b",
        r"\b(tried|try|trying|attempted)\s+to\s+(end\s+(it|my\s+life)|kill\s+myself|"
        r"take\s+my\s+(own\s+)?life|overdose)",
        # Chinese: absence, burden, goodbyes, means, euphemisms, attempts
        r"再也(撑|坚持|熬)不(下去|住)|撑不到(明天|明年|下个?月|下周|周末)",
        r"不想(再)?(醒|醒来|存在|坚持下去|面对明天)",
        r"(永远|彻底|从这个世界上?)消失|(想|希望|不如)(就)?(这样)?消失(掉|算了|就好)",
        r"(睡|睡着|睡过去)(了)?(就)?(永远|再也)?不(要|用)?(再)?醒",
        r"(拖累|累赘|负担).{0,6}(家人|大家|所有人|爸妈|父母|他们|孩子)|"
        r"(家人|大家|所有人|爸妈|父母|他们|孩子).{0,8}(拖累|累赘|负担)",
        r"没有我.{0,6}(会|就|才)(更好|轻松|开心|幸福)",
        r"(遗言|交代后事|安排后事|后事)|(写好|留下)了?.{0,4}(信|遗书)",
        r"(最后一次|最后的).{0,4}(聊天|说话|消息|留言|见面|告别)|永别了|下辈子再见",
        r"(东西|猫|狗|钱|存款|孩子).{0,6}(托付|交给|留给).{0,10}(以后|之后|我走|不在)",
        r"(买|准备|攒|存|找)(好|了)+.{0,4}(绳子|木炭|炭|刀片|农药|老鼠药|安眠药)",
        r"(多少|几)(片|颗|粒).{0,8}(会死|能死|致死|才够|就够)|(多高|几楼).{0,6}(摔|跳).{0,4}死",
        r"(上次|之前|以前|那次)(也)?(试过|尝试过?|吃过药|自杀过?)|洗胃",
        r"(如果|要是|假如)我(消失|不在|走)了?.{0,12}(轻松|更好|解脱|开心)",
        r"(可以|能)?(安心|放心)(地)?走了|(没什么|没有|再无|了无)牵挂",
        r"(别|不要|不用)(再)?醒(过)?来",
        r"从.{0,8}(桥|楼|天台|阳台|窗户|悬崖).{0,6}跳",
        r"提前(下线|退场|离场)|(想|要)?去另一个世界",
        r"(我走了?以后|我不在了?以后).{0,12}(帮我|替我|告诉|跟)",
        r"(今晚|今天|明天)(就)?是我(人生)?(的)?最后一(晚|天)",
    ],
    "self_harm": [
        r"\bmak(e|ing)\s+myself\s+(bleed|hurt|suffer)\b",
        r"\b(until|till)\s+(i|my\s+\w+)\s+bleed|\bpunch(ing)?\s+(walls?|myself)\b",
        r"\bdeserves?\s+(the\s+)?pain\b",
        r"(抓|掐|咬|打)(得|到)?(全是|出)?血|(抓|掐|咬)自己",
        r"\b(cut|cutting|burn|burned|burnt|burning)\s+(myself|my\s+(arms?|legs?|wrists?|skin|thighs?))\b",
        r"\b(wrists?|arms?|thighs?|skin)\b.{0,30}\b(razor|blade)",
        r"\b(razor|blade)s?\b.{0,30}\b(myself|arm|wrist|skin|thigh)",
        r"(用|拿).{0,4}(刀|刀片|烟头|针).{0,6}(划|割|烫|扎)",
        r"(划|割|烫|扎)(自己|手臂|胳膊|手腕)",
        # everyday words for hurting oneself, urges and relapses
        r"\b(hurt|harm|punish|hit|scratch|bruise)\s+(myself|my\s+(body|skin|arms?|legs?|"
        r"thighs?|wrists?|face))\b",
        r"\b(urge|urges|itch|need)\s+to\s+(cut|hurt\s+myself|burn\s+myself|bleed)\b",
        r"\b(relapsed|relapsing)\b.{0,30}\b(cut|cutting|self[- ]?harm|hurting\s+myself)",
        r"\b(bang(ing|ed)?|hit\w*)\s+my\s+head\s+(against|on|into)\b",
        r"(掐|抓|打|撞|咬|扇)(自己|大腿|手臂|胳膊)|(用)?头撞墙",
        r"(疼|痛)(了)?(才|就)(能)?(清醒|好受|舒服|感觉(到)?(自己)?(还)?活着)",
        r"(想|忍不住|控制不住).{0,4}(伤害|弄伤|划|割|烫)(自己)?",
        r"\b(punch|hit|bang|slam)\w*\s+(the\s+|a\s+)?wall\b.{0,40}\b(bled|bleed|blood|broke|"
        r"again)",
        r"\brelaps\w*\b.{0,20}\b(sh|self[\s-]?harm)\b|\b(sh|self[\s-]?harm)\b.{0,20}\bclean\b",
        r"\b(hid|hide|hiding|cover|covering)\s+(the\s+|my\s+)?(cuts|scars|burns)\s+(on\s+my\s+"
        r"(arms?|wrists?|thighs?|legs?|stomach)|so\b)",
        r"\b(razor|blade)\b.{0,60}\b(use\s+it|cut)\b",
        r"饿自己|(故意|想)(惩罚|折磨)自己",
        r"(拳头?|用拳).{0,4}砸墙|砸墙.{0,12}(血|骨头|裂)",
    ],
    "violence": [
        r"\b(want|going|gonna|plan(ning)?|wanna|could)\s+(to\s+)?(hurt|kill|stab|shoot|strangle"
        r"|beat\s+up|punch)\s+(him|her|them|someone|somebody|people|everyone|my\s+\w+|the\s+\w+"
        r"|those\s+\w+)\b",
        r"\b(murder|kill)\s+(him|her|them|someone|somebody|everyone|people)\b",
        r"\b(bring|take|brought|took)\s+a\s+(gun|knife)\s+to\b",
        r"(杀|捅|砍|弄死|打死)(了)?(他|她|他们|她们|那个)",
        r"(想|要|会)杀人",
        r"\bmake\s+(him|her|them)\s+(pay|suffer|regret)\b.{0,40}\b(hurt|kill|knife|gun|"
        r"blood|beat|die|dead)",
        r"\b(he|she|they)('ll|\s+will)\s+(regret|pay)\b.{0,30}\b(knife|gun|hurt|kill)",
        r"(让|要)(他|她|他们|她们)(付出代价|去死|偿命)|(报复|干掉)(他|她|他们|那个)",
        r"(带|拿)(上|着)?(刀|棍子|汽油|锤子).{0,10}(找|去)(他|她|他们)",
        r"\b(bring|take|bringing|taking)\s+a\s+(knife|gun|weapon)\s+to\s+(school|work|class)",
        r"\bmake\s+(him|her|them)\s+bleed\b",
        r"掐死|放(一)?把火|纵火|(陪我|跟我)一起死",
    ],
}

BUILTIN_EXCLUDE: list[str] = [
    r"\b(dead|dying)\s+(tired|bored|serious|hungry)\b",
    r"\b(is|was|are|were|'s|'re)\s+killing\s+me\b",
    r"\bkill(ing)?\s+(time|the\s+mood|the\s+vibe)\b",
    r"\bcould\s+(kill|murder)\s+for\s+a\b",
    r"\bdie\s+(of|from)\s+(embarrassment|laughter|boredom|shame)\b",
    r"\b(bored|embarrassed|laughed|laughing)\s+(so\s+much\s+)?(that\s+)?i\s+could\s+(just\s+)?die\b",
    r"\bdying\s+to\s+(see|know|try|meet|go)\b",
    r"\bmurder\s+(mystery|mysteries|podcast|show|novel|series|documentary)\b",
    r"(累|忙|热|冷|饿|困|气|笑|吓|烦|疼|痛|难受|丑|美|羡慕|尴尬|无聊)死(我|人|了)",
    r"想死(你|您|我)了",
    r"想死你",
    r"跳楼(价|大甩卖)",
    r"打自己的?脸",
    r"要死要活地?(学|复习|工作|加班)",
]

BUILTIN_RESOURCES: dict[str, list[HelpLine]] = {
    "en-US": [
        HelpLine(
            name="988 Suicide & Crisis Lifeline",
            contact="call or text 988",
            note="free, confidential, 24/7 (US)",
        ),
        HelpLine(name="Crisis Text Line", contact="text HOME to 741741", note="24/7 (US)"),
        HelpLine(name="Emergency services", contact="911", note="if you or someone is in danger"),
    ],
    "zh-CN": [
        HelpLine(
            name="全国统一心理援助热线", contact="12356", note="国家卫生健康委开通的心理援助热线"
        ),
        HelpLine(name="希望24热线", contact="400-161-9995", note="24小时心理危机干预"),
        HelpLine(name="急救 / 报警", contact="120 / 110", note="有生命危险时请立即拨打"),
    ],
}

BUILTIN_FIXED_REPLY: dict[str, str] = {
    "en-US": (
        "I'm really glad you told me, and I'm taking what you said seriously. You don't have to "
        "carry this alone. Please reach out right now to someone who can be with you in this: "
        "a crisis line, emergency services, or a person you trust nearby."
    ),
    "zh-CN": (
        "谢谢你愿意告诉我，我很认真地看待你说的话。你不需要一个人扛着这些。"
        "请现在就联系能陪你一起面对的人：心理援助热线、急救电话，或者身边你信任的人。"
    ),
}

RESOURCES_HEADER = {
    "en-US": "If you are in crisis, help is available:",
    "zh-CN": "如果你正处于危机中，可以寻求这些帮助：",
}

_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True, slots=True)
class SafetyScreen:
    """Compiled detector plus the resources to attach; built once per ingress replica."""

    rules: dict[str, tuple[re.Pattern[str], ...]]  # category -> lexicon + patterns, compiled
    exclude: tuple[re.Pattern[str], ...]
    resources: dict[str, list[HelpLine]]
    fixed_reply: dict[str, str]
    cfg: SafetyConfig


def build_screen(cfg: SafetyConfig) -> SafetyScreen:
    lexicon = cfg.lexicon if cfg.lexicon is not None else BUILTIN_LEXICON
    patterns = cfg.patterns if cfg.patterns is not None else BUILTIN_PATTERNS
    exclude = cfg.exclude if cfg.exclude is not None else BUILTIN_EXCLUDE
    resources = cfg.resources if cfg.resources is not None else BUILTIN_RESOURCES
    replies = cfg.fixed_reply if cfg.fixed_reply is not None else BUILTIN_FIXED_REPLY
    for locale in {cfg.default_locale, *([] if cfg.locale == "auto" else [cfg.locale])}:
        if locale not in resources or locale not in replies:
            raise ValueError(
                f"serve.safety has no resources or fixed_reply for locale {locale!r}; add it to "
                f"serve.safety.resources and serve.safety.fixed_reply (known: {sorted(resources)})"
            )
    return SafetyScreen(
        rules={
            c: tuple(
                [_compile(_phrase_regex(p)) for p in lexicon.get(c, [])]
                + [_compile(p) for p in patterns.get(c, [])]
            )
            for c in sorted({*lexicon, *patterns})
        },
        exclude=tuple(_compile(p) for p in exclude),
        resources=resources,
        fixed_reply=replies,
        cfg=cfg,
    )


def _phrase_regex(phrase: str) -> str:
    """A lexicon phrase as a regex: English words also match inflected forms ("hang myself"
    matches "hanging myself"), other scripts match as written."""
    if not phrase.isascii():
        return re.escape(phrase.lower())
    words = [re.escape(w) + r"\w{0,4}" for w in phrase.lower().split()]
    return r"\b" + r"\s+".join(words)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"serve.safety pattern {pattern!r} is not a valid regex: {e}") from None


def detect(screen: SafetyScreen, text: str) -> list[str]:
    """The crisis categories found in one message (empty = none)."""
    cleaned = text.lower().replace("\u2019", "'")
    for pattern in screen.exclude:
        cleaned = pattern.sub(" ", cleaned)
    return [c for c, rules in screen.rules.items() if any(r.search(cleaned) for r in rules)]


def pick_locale(screen: SafetyScreen, texts: list[str]) -> str:
    if screen.cfg.locale != "auto":
        return screen.cfg.locale
    if any(_CJK.search(t) for t in texts) and "zh-CN" in screen.resources:
        return "zh-CN"
    return screen.cfg.default_locale


def assess(screen: SafetyScreen, user_texts: list[str]) -> SafetyInfo:
    """Screen the latest user turns (the last `scan_user_turns` of `user_texts`)."""
    if not screen.cfg.enabled or not user_texts:
        return SafetyInfo()
    latest = user_texts[-screen.cfg.scan_user_turns :]
    categories = sorted({c for text in latest for c in detect(screen, text)})
    if not categories:
        return SafetyInfo()
    locale = pick_locale(screen, latest)
    lines = [HelpLineOut(**h.model_dump()) for h in screen.resources[locale]]
    return SafetyInfo(flagged=True, categories=categories, locale=locale, resources=lines)


def fixed_reply(screen: SafetyScreen, info: SafetyInfo) -> str:
    locale = info.locale or screen.cfg.default_locale
    return f"{screen.fixed_reply[locale]}\n\n{format_resources(info)}"


def format_resources(info: SafetyInfo) -> str:
    """The help lines as text appended to a reply."""
    header = RESOURCES_HEADER.get(info.locale or "", RESOURCES_HEADER["en-US"])
    lines = [
        f"- {r.name}: {r.contact}" + (f" ({r.note})" if r.note else "") for r in info.resources
    ]
    return "\n".join([header, *lines])
