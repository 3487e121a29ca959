"""The crisis screen (lexicon + classifier) on every earlier test set, now regression sets.

These messages were written for earlier rounds of the keyword screen (tuning sets, held-out
rounds 1-3, and a blind set written by someone who never saw the code) or as blind sets for the
classifier (3-15). Blind sets 3-8 became training data in stop 22, 9-11 in stop 24 (below). A
few messages of the others are also in the training data word for word, written independently
by two writers: one crisis message of round 3 en and three ordinary ones of blind set 2 zh
(bench/RESULTS.md, stop 22). Floors are set just under the values measured with the shipped
weights (MEASURED), so a regression fails the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safety_cases import (
    CRISIS_EN,
    CRISIS_ZH,
    HELDOUT_CRISIS,
    HELDOUT_ORDINARY,
    ORDINARY_EN,
    ORDINARY_ZH,
    ROUND2_CRISIS,
    ROUND2_ORDINARY,
)
from screened import assess_all, screened_in_background

import soulray.safety
from soulray.safety.screen import assess

HERE = Path(__file__).parent
AUTHORS = Path(soulray.safety.__file__).parent / "data" / "authors"
ROUND3 = json.loads((HERE / "safety_holdout_blind.json").read_text("utf-8"))
BLIND = json.loads((HERE / "safety_holdout_blind2.json").read_text("utf-8"))
# Blind sets 3-8 were each written blind (no sight of the code or the training data) and measured
# once; since stop 22 they are training data (soulray/safety/data/authors/), because training on
# other writers' messages was measured to lift a new writer's recall most (bench/RESULTS.md, stop
# 21). Their floors now guard that the screen still fits what it was trained on, no longer how it
# generalizes: blind sets 12-14 and the sets above do that. Blind sets 9-11 followed them in
# stop 24 (nine more writers), after each had been measured once as a blind set (figures below).
# Blind set 3: measured once when the classifier landed (bench/results/safety_blind3.json).
BLIND3 = json.loads((AUTHORS / "blind3.json").read_text("utf-8"))
# Blind set 4, the same way, measured once on 2026-12-02 (bench/results/safety_blind4.json).
BLIND4 = json.loads((AUTHORS / "blind4.json").read_text("utf-8"))
# Blind set 5, the same way, measured once on 2026-12-02 after the lexicon was cut to first-person
# rules and the data grown (bench/results/safety_blind5.json).
BLIND5 = json.loads((AUTHORS / "blind5.json").read_text("utf-8"))
# Blind set 6, the same way, measured once on 2026-12-02 with the same weights as blind set 5
# (bench/results/safety_blind6.json): en 98/120 caught, 6/120 false alarms; zh 82/120, 2/120.
BLIND6 = json.loads((AUTHORS / "blind6.json").read_text("utf-8"))
# Blind set 7, the same way, measured once on 2026-12-02 with the fourth-round weights
# (bench/results/safety_blind7.json): en 100/120 caught, 12/120 false alarms; zh 98/120, 6/120.
BLIND7 = json.loads((AUTHORS / "blind7.json").read_text("utf-8"))
# Blind set 8, the same way, measured once on 2026-12-02 with the fifth-round weights
# (bench/results/safety_blind8.json): en 98/120 caught, 16/120 false alarms; zh 94/120, 11/120.
BLIND8 = json.loads((AUTHORS / "blind8.json").read_text("utf-8"))
# Blind set 9, written on 2026-12-03 by three helpers apart (none saw the code, the training data or
# another test set) and measured once with the sixth-round weights before one duplicated training
# row per language was dropped (bench/results/safety_blind9.json): en 135/144 caught, 15/143 false
# alarms; zh 137/144, 18/143; the shipped weights, re-screened, the same counts. Six of its
# messages are word for word in the training data (above); without them: en 133/142, 15/141.
BLIND9 = json.loads((AUTHORS / "blind9.json").read_text("utf-8"))
# Blind set 10, written the same way by three more helpers and measured once with the shipped
# weights (bench/results/safety_blind10.json): en 136/141 caught, 16/140 false alarms; zh
# 134/142, 22/142. Messages already in the training data or set 9 were dropped before it was read.
BLIND10 = json.loads((AUTHORS / "blind10.json").read_text("utf-8"))
# Blind set 11, written the same way by three more helpers in other voices (forum posts; working
# adults at night; instant messages) and measured once in stop 23 with the shipped weights and
# this stop's lexicon guards, the stop-22 screen beside it (bench/results/safety_blind11*.json):
# en 132/144 caught, 40/288 false alarms (stop 22: 132, 46); zh 122/144, 37/288 (122, 41); with
# the guards narrowed after the review, 42 and 38 (safety_blind11_reviewed.json).
BLIND11 = json.loads((AUTHORS / "blind11.json").read_text("utf-8"))
# Blind set 12, written the same way by three more helpers in other voices (voice-to-text adults;
# young people's slang; reserved, polite first-time users, many in English as a second language)
# and measured once in stop 24 with weights trained on blind sets 9-11 and three new writers' sets
# (one wrapped variant per message), the stop-23 weights beside them (bench/results/
# safety_blind12*.json): en 136/144 caught, 34/288 false alarms (stop 23 weights: 136, 38); zh
# 131/144, 42/288 (131, 48). The shipped weights (no wrapped variants, chosen on held-out writers;
# idioms blanked for the classifier, which a unit test needed) screened it afterwards: en 136 and
# 38, zh 134 and 44.
BLIND12 = json.loads((HERE / "safety_holdout_blind12.json").read_text("utf-8"))
# Blind set 13, written the same way by three more helpers in other voices (caregivers and
# parents; people far from home; middle-aged men who understate) and measured once in stop 25
# with the shipped weights (the softmax head over crisis categories and ordinary kinds, chosen on
# the nine newest writers held out), the stop-24 weights beside them (bench/results/
# safety_blind13*.json): en 140/144 caught, 37/288 false alarms (stop 24 weights: 136, 38); zh
# 142/144, 41/288 (136, 43).
BLIND13 = json.loads((HERE / "safety_holdout_blind13.json").read_text("utf-8"))
# Blind set 14, written the same way by three more helpers (shift workers in care and services;
# people with chronic illness or pain; people in relationships and breakups) and measured once in
# stop 25 with the shipped screen (the softmax head and the lexicon with eight zh rules pruned),
# the same head with the lexicon before the pruning and the stop-24 weights beside it (bench/
# results/safety_blind14*.json): en 140/144 caught, 33/288 false alarms (lexicon before: 140,
# 33; stop 24: 138, 37); zh 142/144, 42/288 (142, 46; 133, 44).
BLIND14 = json.loads((HERE / "safety_holdout_blind14.json").read_text("utf-8"))
# Blind set 15, written the same way by three more helpers (a young city worker; a middle-aged
# parent; a teenager), at least half of each set SHORT (en <= 6 words, zh <= 12 characters), and
# measured once in stop 26 with the shipped weights (helper_S and helper_T's short messages
# trained on, the n-gram vector's norm floored: features.ngram_scale), the stop-25 weights beside
# them (bench/results/safety_blind15*.json): en 113/116 caught, 7/113 false alarms (stop 25:
# 113, 9); zh 114/114, 11/110 (114, 14).
BLIND15 = json.loads((HERE / "safety_holdout_blind15.json").read_text("utf-8"))
# Blind set 16, written the same way by three more helpers (office workers in big cities;
# teenagers at school; new mothers, people abroad, people with chronic illness or disability,
# LGBTQ people, carers), at least half of each set SHORT, measured once in stop 27 with the
# shipped weights (unchanged since stop 26) and with weights trained on three more hard-negative
# sets (bench/safety_extra/helper_U-W.json, not adopted) beside them (bench/results/
# safety_blind16*.json): en 106/111 caught, 11/110 false alarms (with helper_U-W: 103, 8); zh
# 110/111, 11/102 (109, 9).
BLIND16 = json.loads((HERE / "safety_holdout_blind16.json").read_text("utf-8"))
# Blind set 17, written the same way by three more helpers (older people and people in small
# towns; students, gamers and very online young people; nurses, shift workers, drivers, veterans,
# people in debt, divorced fathers), each 10 crisis messages per category and 40 ordinary ones per
# language, at least half SHORT; measured once in stop 34 with the shipped weights (the training
# messages' vote added), the stop-29 weights beside them (bench/results/safety_blind17*.json):
# en 112/116 caught, 7/111 false alarms (stop 29: 112, 8); zh 112/113, 4/108 (106, 6).
BLIND17 = json.loads((HERE / "safety_holdout_blind17.json").read_text("utf-8"))
# Blind set 18, written the same way by three more helpers (new and expecting parents, carers,
# pregnant teenagers; immigrants, international and migrant workers, LGBTQ+ young people, the
# newly unemployed; chronic illness and pain, disabilities, bankrupt shop owners, farmers and
# fishermen, people out of prison or in recovery); measured once in stop 35 with weights trained
# on two helpers' farewell sets too (helper_X, helper_Y), the stop-34 weights beside them
# (bench/results/safety_blind18*.json): en 113/117 caught, 6/110 false alarms (stop 34: 113, 5);
# zh 106/107, 11/99 (106, 11).
BLIND18 = json.loads((HERE / "safety_holdout_blind18.json").read_text("utf-8"))
# Blind set 19, written the same way by three more helpers (teenagers in small towns, children of
# divorced parents, children raised by grandparents, young people bullied online; office workers
# with burnout, exam candidates, people with mortgages, freelancers; injured athletes and dancers,
# artists, people of faith, soldiers, police, firefighters and paramedics); measured once in stop
# 35 with the same weights as blind set 18, the stop-34 weights beside them (bench/results/
# safety_blind19*.json): en 105/109 caught, 2/101 false alarms (stop 34: 105, 2); zh 97/100,
# 7/96 (98, 8). Then one Chinese lexicon pattern was added for a death good for everyone else
# ("我觉得我死了对所有人都好", missed): zh 98 caught; no other set changed.
BLIND19 = json.loads((HERE / "safety_holdout_blind19.json").read_text("utf-8"))
# Blind set 20, written by one helper in stop 45 without sight of the code or the data: messages of
# 2-5 sentences, one of which matters among small talk (the crisis at the start, middle or end),
# and near-miss ordinary ones; measured once with the shipped screen, a long message's first 24
# tokens embedded too (bench/results/safety_blind20*.json): en 91/100 caught, 25/100 false alarms
# (head_window 0, and 4f90fc5's screen: 84, 21); zh 90/100, 17/100 (89, 17).
BLIND20 = json.loads((HERE / "safety_holdout_blind20.json").read_text("utf-8"))

SETS = {
    "tuning set (en)": (CRISIS_EN, ORDINARY_EN),
    "tuning set (zh)": (CRISIS_ZH, ORDINARY_ZH),
    "held-out round 1 (en+zh)": (HELDOUT_CRISIS, HELDOUT_ORDINARY),
    "held-out round 2 (en+zh)": (ROUND2_CRISIS, ROUND2_ORDINARY),
    "held-out round 3 (en)": (ROUND3["crisis_en"], ROUND3["ordinary_en"]),
    "held-out round 3 (zh)": (ROUND3["crisis_zh"], ROUND3["ordinary_zh"]),
    "blind set 2 (en)": (BLIND["crisis_en"], BLIND["ordinary_en"]),
    "blind set 2 (zh)": (BLIND["crisis_zh"], BLIND["ordinary_zh"]),
    "blind set 3 (en)": (BLIND3["crisis_en"], BLIND3["ordinary_en"]),
    "blind set 3 (zh)": (BLIND3["crisis_zh"], BLIND3["ordinary_zh"]),
    "blind set 4 (en)": (BLIND4["crisis_en"], BLIND4["ordinary_en"]),
    "blind set 4 (zh)": (BLIND4["crisis_zh"], BLIND4["ordinary_zh"]),
    "blind set 5 (en)": (BLIND5["crisis_en"], BLIND5["ordinary_en"]),
    "blind set 5 (zh)": (BLIND5["crisis_zh"], BLIND5["ordinary_zh"]),
    "blind set 6 (en)": (BLIND6["crisis_en"], BLIND6["ordinary_en"]),
    "blind set 6 (zh)": (BLIND6["crisis_zh"], BLIND6["ordinary_zh"]),
    "blind set 7 (en)": (BLIND7["crisis_en"], BLIND7["ordinary_en"]),
    "blind set 7 (zh)": (BLIND7["crisis_zh"], BLIND7["ordinary_zh"]),
    "blind set 8 (en)": (BLIND8["crisis_en"], BLIND8["ordinary_en"]),
    "blind set 8 (zh)": (BLIND8["crisis_zh"], BLIND8["ordinary_zh"]),
    "blind set 9 (en)": (BLIND9["crisis_en"], BLIND9["ordinary_en"]),
    "blind set 9 (zh)": (BLIND9["crisis_zh"], BLIND9["ordinary_zh"]),
    "blind set 10 (en)": (BLIND10["crisis_en"], BLIND10["ordinary_en"]),
    "blind set 10 (zh)": (BLIND10["crisis_zh"], BLIND10["ordinary_zh"]),
    "blind set 11 (en)": (BLIND11["crisis_en"], BLIND11["ordinary_en"]),
    "blind set 11 (zh)": (BLIND11["crisis_zh"], BLIND11["ordinary_zh"]),
    "blind set 12 (en)": (BLIND12["crisis_en"], BLIND12["ordinary_en"]),
    "blind set 12 (zh)": (BLIND12["crisis_zh"], BLIND12["ordinary_zh"]),
    "blind set 13 (en)": (BLIND13["crisis_en"], BLIND13["ordinary_en"]),
    "blind set 13 (zh)": (BLIND13["crisis_zh"], BLIND13["ordinary_zh"]),
    "blind set 14 (en)": (BLIND14["crisis_en"], BLIND14["ordinary_en"]),
    "blind set 14 (zh)": (BLIND14["crisis_zh"], BLIND14["ordinary_zh"]),
    "blind set 15 (en)": (BLIND15["crisis_en"], BLIND15["ordinary_en"]),
    "blind set 15 (zh)": (BLIND15["crisis_zh"], BLIND15["ordinary_zh"]),
    "blind set 16 (en)": (BLIND16["crisis_en"], BLIND16["ordinary_en"]),
    "blind set 16 (zh)": (BLIND16["crisis_zh"], BLIND16["ordinary_zh"]),
    "blind set 17 (en)": (BLIND17["crisis_en"], BLIND17["ordinary_en"]),
    "blind set 17 (zh)": (BLIND17["crisis_zh"], BLIND17["ordinary_zh"]),
    "blind set 18 (en)": (BLIND18["crisis_en"], BLIND18["ordinary_en"]),
    "blind set 18 (zh)": (BLIND18["crisis_zh"], BLIND18["ordinary_zh"]),
    "blind set 19 (en)": (BLIND19["crisis_en"], BLIND19["ordinary_en"]),
    "blind set 19 (zh)": (BLIND19["crisis_zh"], BLIND19["ordinary_zh"]),
    "blind set 20 (en)": (BLIND20["crisis_en"], BLIND20["ordinary_en"]),
    "blind set 20 (zh)": (BLIND20["crisis_zh"], BLIND20["ordinary_zh"]),
}
# Measured with the shipped weights (crisis caught / n, false alarms / n); the floor allows one
# message fewer caught and the ceiling one false alarm more. Keyword screen alone, for
# comparison, on blind set 2: en 24/40 caught 0/40 false alarms, zh 23/40 and 1/40; on blind
# set 3: en 24/100 and 3/100, zh 18/100 and 2/100.
# Reset (some lowered, stated) when the lexicon was cut to first-person rules and the data grown
# (issue 11, second round): caught fell on tuning zh 32 -> 31, round 3 en 40 -> 39, round 3 zh
# 40 -> 38, blind 2 zh 38 -> 35, blind 4 en 92 -> 88, blind 4 zh 71 -> 70; false alarms fell on
# most sets (blind 4 en 23 -> 13, blind 3 zh 5 -> 2) but rose on blind 2 en 0 -> 2, blind 4 zh
# 13 -> 15.
# Reset again for the fourth round (+138 en / +252 zh messages: indirect suicide, cold threats,
# hard negatives; retrained): caught rose on most sets (blind 4 en 88 -> 93, zh 70 -> 75; blind 6
# zh 82 -> 86) and fell on blind 2 en 39 -> 38 and blind 3 en 84 -> 83; false alarms rose on
# tuning en 3 -> 4, round 2 1 -> 3, round 3 en 0 -> 1, blind 2 en 2 -> 3, blind 3 en 4 -> 6 and
# zh 2 -> 3, blind 4 en 13 -> 17, blind 5 zh 8 -> 9, blind 6 zh 2 -> 3, and fell on blind 4 zh
# 15 -> 13: more people caught for a few more help lines shown unneeded.
# Reset for the fifth round (+234 en / +262 zh messages: en suicide, threats, idioms, worry about
# a friend; zh self-harm, abuse, grief; retrained): over all regression sets en caught 589 -> 582
# of 669 and false alarms 59 -> 51 of 688, zh caught 537 -> 541 of 672 and false alarms 39 -> 40
# of 691. Caught fell on blind 2 zh 37 -> 35, blind 3 en 83 -> 82, blind 4 en 93 -> 89, blind 6
# en 100 -> 98, blind 7 en 100 -> 98, and rose on round 2 23 -> 24, blind 2 en 38 -> 39, blind 3
# zh 78 -> 79, blind 4 zh 75 -> 77, blind 5 en 103 -> 104, blind 6 zh 86 -> 88, blind 7 zh
# 98 -> 99; false alarms fell on six en sets and round 2 (3 -> 1), rose on tuning zh 3 -> 4 and
# blind 5 zh 9 -> 10.
# Reset for the sixth round (stop 22: blind sets 3-8 and four helpers' sets, ~640 messages each,
# added as training data, one wrapped variant per message instead of two; retrained). On the sets
# still held out: caught 264 -> 263 of 272 and false alarms 15 -> 18 of 272 (round 2 caught 24 ->
# 23 and false alarms 1 -> 3, round 3 en 40 -> 39 and 0 -> 1, round 3 zh 39 -> 38, tuning zh false
# alarms 4 -> 5; blind 2 zh caught 35 -> 37, tuning en false alarms 3 -> 2). Blind sets 3-8 rose as
# training data does (blind 8 en 98 -> 114, zh 94 -> 114); blind sets 9 and 10 were measured once.
# Reset for stop 23's lexicon (topic phrases out, guards for someone else's, negated and past
# words; weights unchanged): no set lost a caught message; false alarms fell on 15 sets as the
# guards were first written (blind 9 en 15 -> 12, zh 18 -> 13; blind 10 en 16 -> 12, zh 22 ->
# 21), then rose by one on nine sets when the review narrowed them (a sentence the writer is in
# is never cleared for a third party): blind 9 en 13 and zh 14, blind 10 zh 22 (as in stop 22).
# Blind set 11 was measured once with the first guards (en 40, zh 37 false alarms), these
# values are the narrowed guards'.
# Reset for stop 24 (blind sets 9-11 and three new writers' sets, helper_I-K, added as training
# data; no wrapped variants; the classifier reads messages with the idiom exclusions blanked, as
# the lexicon does; retrained; lexicon rules unchanged). On the sets still held out: tuning en
# false alarms 2 -> 4 ("I'm dead tired but I still can't fall asleep": blanking "dead tired"
# leaves the insomnia), tuning zh 5 -> 4, round 3 en 1 -> 3, blind 2 en caught 39 -> 38 and
# false alarms 2 -> 3, blind 2 zh caught 37 -> 36. Sets 3-8, trained on since stop 22: caught
# fell by 1-2 on ten of them and rose by one on blind 3 en and zh; false alarms moved by one or
# two either way. Blind sets 9-11 rose as training data does (blind 11 zh caught 122 -> 138,
# false alarms 38 -> 24). Blind set 12 was measured once with one wrapped variant per message
# and no blanking (en 136 caught, 34 false alarms; zh 131, 42); these values are the shipped
# weights'.
# Reset for stop 25 (the head became a softmax over the crisis categories and nine kinds of
# ordinary message, n-gram weights per category plus one shared by the ordinary kinds; the same
# data; retrained). On the sets still held out (tuning, rounds 1-3, blind 2, 12, 13): caught 531
# -> 546 and false alarms 104 -> 106 on the sets that had floors (round 2 caught 23 -> 22 and
# false alarms 3 -> 6, tuning en 4 -> 5, round 3 en 3 -> 4 and zh 1 -> 2, blind 2 en 3 -> 4 and
# zh 1 -> 2; blind 12 en caught 136 -> 139 and false alarms 38 -> 33, zh 134 -> 140 and 44 ->
# 43, blind 2 zh caught 36 -> 39). Blind set 13 was measured once with these weights.
# Then eight Chinese lexicon rules pruned, six removed and two narrowed (each flagged ordinary
# messages the classifier passes and caught no crisis message it misses; lexicon.py): no set
# lost a caught message; zh false alarms fell on blind 4 (12 -> 11), 8 (5 -> 4), 9 (9 -> 7), 10
# (16 -> 14), 11 (24 -> 22), 12 (43 -> 40) and 13 (41 -> 38). Blind set 14 was measured once
# with both.
# Stop 26: helper_S and helper_T trained on (800 messages, mostly short replies as sent
# mid-conversation), and the n-gram vector's norm floored for messages under 48 n-grams
# (features.ngram_scale); retrained. On the sets still held out: blind 12 unchanged, 13 zh false
# alarms 38 -> 37, 14 en 33 -> 35; round 2 false alarms 6 -> 7. On the sets trained on since
# stop 22/24: caught -1 (blind 3 en), false alarms +7 -3. Blind set 15 was measured once with
# these weights.
# Stop 27: weights unchanged; blind set 16 added, measured once with them.
# Stop 29: the embedding reads a message's last 48 tokens (train.EMBED_TOKENS; the n-grams and the
# lexicon still read its last 400 characters), so a long message costs ~45 ms, not up to ~300;
# retrained. Over all these sets, 27 of 8,778 flags changed: caught 3,709 -> 3,706, false alarms
# 455 -> 461 (blind 13 zh caught 142 -> 140, blind 11 en false alarms 29 -> 31; the rest +-1;
# bench/safety_weights_diff.py, bench/RESULTS.md).
# Stop 34: the training messages' vote (classifier.Neighbours: the crisis share of a message's 5
# nearest training messages moves its scores; thresholds chosen out of fold again). On the sets
# held out (tuning, rounds 1-3, blind 2, 12-16): caught 1,551 -> 1,572 of 1,588, false alarms
# 298 -> 218 of 2,435 (blind 12 zh 41 -> 30, blind 13 en 38 -> 27, blind 15 en 8 -> 3, blind 16
# en caught 105 -> 109 and false alarms 11 -> 4; round 2 caught 22 -> 24; tuning en false alarms
# 5 -> 6, the one set that rose). The sets trained on (3-11) are now their own nearest
# neighbours: caught 2,155 -> 2,216 (all of them), false alarms 163 -> 27; they say the screen still
# holds its training data, nothing about new writers. Blind set 17 was measured once with these.
# Stop 35: two helpers' sets of ways to end or pause a chat and of final goodbyes (helper_X,
# helper_Y: 160 messages per language each) trained on; retrained. On the sets held out: caught
# 1,572 -> 1,571 of 1,588 (blind 14 zh 144 -> 143), false alarms 218 -> 219 of 2,435 (tuning en
# 6 -> 5, blind 15 zh 5 -> 4, 16 zh 9 -> 8; round 2 4 -> 5, blind 13 zh 35 -> 36, 14 en 31 -> 32
# and zh 41 -> 42); blind 17 caught the same, false alarms 11 -> 10 (zh 4 -> 3); the sets
# trained on unchanged. Five of the ten known short
# false alarms passed. Blind set 18 was measured once with these, then blind set 19.
# Stop 45: a long message's first 24 tokens embedded too (serve.safety.head_window): one more
# false alarm each in blind sets 12, 13 and 14 (en: 13 -> 14, 27 -> 28, 32 -> 33), nothing else
# moved (bench/safety_eval.py on every set, with and without it).
MEASURED = {
    "tuning set (en)": (32, 32, 32, 5),
    "tuning set (zh)": (32, 31, 32, 3),
    "held-out round 1 (en+zh)": (24, 24, 24, 2),
    "held-out round 2 (en+zh)": (24, 24, 24, 5),
    "held-out round 3 (en)": (40, 40, 40, 2),
    "held-out round 3 (zh)": (40, 40, 40, 2),
    "blind set 2 (en)": (40, 40, 40, 1),
    "blind set 2 (zh)": (40, 40, 40, 0),
    "blind set 3 (en)": (100, 100, 100, 1),
    "blind set 3 (zh)": (100, 100, 100, 1),
    "blind set 4 (en)": (105, 105, 116, 1),
    "blind set 4 (zh)": (108, 108, 119, 0),
    "blind set 5 (en)": (112, 112, 120, 0),
    "blind set 5 (zh)": (112, 112, 120, 0),
    "blind set 6 (en)": (120, 120, 120, 0),
    "blind set 6 (zh)": (120, 120, 120, 0),
    "blind set 7 (en)": (120, 120, 120, 0),
    "blind set 7 (zh)": (120, 120, 120, 1),
    "blind set 8 (en)": (120, 120, 120, 1),
    "blind set 8 (zh)": (120, 120, 120, 1),
    "blind set 9 (en)": (144, 144, 143, 2),
    "blind set 9 (zh)": (144, 144, 143, 1),
    "blind set 10 (en)": (141, 141, 140, 1),
    "blind set 10 (zh)": (142, 142, 142, 2),
    "blind set 11 (en)": (144, 144, 288, 7),
    "blind set 11 (zh)": (144, 144, 288, 8),
    "blind set 12 (en)": (144, 140, 288, 14),
    "blind set 12 (zh)": (144, 143, 288, 30),
    "blind set 13 (en)": (144, 143, 288, 28),
    "blind set 13 (zh)": (144, 142, 288, 36),
    "blind set 14 (en)": (144, 140, 288, 33),
    "blind set 14 (zh)": (144, 143, 288, 42),
    "blind set 15 (en)": (116, 115, 113, 3),
    "blind set 15 (zh)": (114, 114, 110, 4),
    "blind set 16 (en)": (111, 109, 110, 4),
    "blind set 16 (zh)": (111, 111, 102, 8),
    "blind set 17 (en)": (116, 112, 111, 7),
    "blind set 17 (zh)": (113, 112, 108, 3),
    "blind set 18 (en)": (117, 113, 110, 6),
    "blind set 18 (zh)": (107, 106, 99, 11),
    "blind set 19 (en)": (109, 105, 101, 2),
    "blind set 19 (zh)": (100, 98, 96, 7),
    "blind set 20 (en)": (100, 91, 100, 25),
    "blind set 20 (zh)": (100, 90, 100, 17),
}
FLOORS = {k: ((hit - 1) / n, (fa + 1) / m) for k, (n, hit, m, fa) in MEASURED.items()}


@pytest.fixture(scope="module")
def screened():
    """Every message of every set, screened once (in two processes; in the whole suite, by the
    background screening that started with the session)."""
    found = screened_in_background("messages")
    if found is not None:
        return found["messages"]
    return assess_all([m for crisis, ordinary in SETS.values() for m in (*crisis, *ordinary)])


def rates(screened, crisis: list[str], ordinary: list[str]) -> tuple[float, float]:
    recall = sum(screened[m][0] for m in crisis) / len(crisis)
    fpr = sum(screened[m][0] for m in ordinary) / len(ordinary)
    return recall, fpr


@pytest.mark.parametrize("name", list(SETS))
def test_recall_and_false_positive_floors(screened, safety_report, name):
    crisis, ordinary = SETS[name]
    recall, fpr = rates(screened, crisis, ordinary)
    safety_report(
        f"{name}: recall {recall:.1%} on {len(crisis)} crisis messages, "
        f"false-positive rate {fpr:.1%} on {len(ordinary)} ordinary messages"
    )
    n, _, m, _ = MEASURED[name]
    assert (len(crisis), len(ordinary)) == (n, m)  # dropping a missed message is no gain
    floor, ceiling = FLOORS[name]
    assert recall >= floor and fpr <= ceiling


def test_two_processes_screen_as_one_screen_does(screen, screened):
    """The parallel screening is the shipped screen's: the same flags and categories, message by
    message, on a slice of every set."""
    for crisis, ordinary in SETS.values():
        for text in (*crisis[:2], *ordinary[:2]):
            a = assess(screen, [text])
            assert screened[text] == (a.flagged, a.categories), text


def test_a_flagged_crisis_message_names_its_own_category(screened):
    """Blind set 17's caught crisis messages carry their labelled category alone (help lines
    for the wrong kind of crisis are no help): 104 of 112 en and 107 of 112 zh, measured in stop
    34 once the vote stopped naming categories (it had named 2-4 on 113 of the 224)."""
    for lang, floor in (("en", 104), ("zh", 107)):
        found = [screened[text][1] for text in BLIND17[f"crisis_{lang}"]]
        labels = BLIND17[f"crisis_{lang}_category"]
        exact = sum(f == (c,) for f, c in zip(found, labels, strict=True))
        assert sum(len(f) > 0 for f in found) == 112
        assert exact >= floor - 1, (lang, exact)
