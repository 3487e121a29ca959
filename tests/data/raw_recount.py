"""An independent recount of the real corpora: plain `json` and the cleaning rules written out
again (strip, drop empty turns, merge consecutive turns of one role keeping the first strategy,
reject a conversation with no assistant turn after its first user turn, dedupe by roles and
contents), never soulray's adapters. test_formats.py and test_prepare_ray.py compare with it."""

from __future__ import annotations

from collections import Counter

ROLES = {"client": "user", "counselor": "assistant", "speaker": "user", "listener": "assistant"}
# by hand, from the raw names in FailedESConv to the taxonomy (the others are taxonomy names)
STRATEGY = {
    "Questions": "Question",
    "Other": "Others",
    "Direct Guidance": "Others",
    "Approval and Reassurance": "Affirmation and Reassurance",
    "Restatement": "Restatement or Paraphrasing",
}


def raw_turns(record, kind: str) -> list[tuple[str, str, str | None]]:
    """(role, content, strategy) of a record as written, for the four real formats."""
    match kind:
        case "messages":
            return [(m["role"], m["content"], m.get("strategy")) for m in record["messages"]]
        case "smile":
            return [(ROLES[t["role"]], t["content"], None) for t in record]
        case "xtuner":
            turns = []
            for pair in record["conversation"]:
                turns += [("system", pair["system"], None)] if "system" in pair else []
                turns += [("user", pair["input"], None), ("assistant", pair["output"], None)]
            return turns
        case "esconv":
            return [
                (ROLES[t["speaker"]], t["content"], t["annotation"].get("strategy"))
                for t in record["dialog"]
            ]
    raise ValueError(kind)


def recount(records: list, kind: str) -> Counter:
    """Counts over records of one format: records, raw_turns, kept, turns, merged, empty,
    targets, assistant, assistant_first, label.<name> (first label of each assistant message,
    mapped), strategy.<name> (the same over targets only), strategies_dropped (merged-in
    assistant turns labelled otherwise than their message's first), rejected, duplicate."""
    out, seen = Counter(), set()
    for record in records:
        turns = raw_turns(record, kind)
        out.update(records=1, raw_turns=len(turns))
        merged: list[list] = []  # [role, content, [strategies]]
        for role, content, strategy in turns:
            if not content.strip():
                out["empty"] += 1
            elif merged and merged[-1][0] == role:
                merged[-1][1] += "\n" + content.strip()
                merged[-1][2].append(STRATEGY.get(strategy, strategy))
                out["merged"] += 1
            else:
                merged.append([role, content.strip(), [STRATEGY.get(strategy, strategy)]])
        roles = [m[0] for m in merged]
        first_user = roles.index("user") if "user" in roles else len(roles)
        targets = [m for m in merged[first_user:] if m[0] == "assistant"]
        key = tuple((m[0], m[1]) for m in merged)
        if not targets or key in seen:
            out["rejected" if not targets else "duplicate"] += 1
            continue
        seen.add(key)
        out.update(kept=1, turns=len(merged), targets=len(targets))
        out.update(assistant=roles.count("assistant"), assistant_first=roles[0] == "assistant")
        replies = [m[2] for m in merged if m[0] == "assistant"]
        out.update(f"label.{labels[0]}" for labels in replies if labels[0])
        out.update(f"strategy.{t[2][0]}" for t in targets if t[2][0])
        out["strategies_dropped"] += sum(x != labels[0] for labels in replies for x in labels[1:])
    return +out
