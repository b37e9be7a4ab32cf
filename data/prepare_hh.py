"""
Anthropic HH-RLHF -> our preference JSONL.

    python -m data.prepare_hh ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz runs/hh.jsonl

Each HH record is {"chosen", "rejected"}, two whole dialogues "\\n\\nHuman: ...\\n\\nAssistant: ..."
that share every turn but the last assistant one. Output records are TRL's conversational form:
{"prompt": [messages ending with a user turn], "chosen": [assistant msg], "rejected": [assistant msg]}.
Records that cannot be parsed (e.g. the dialogues differ before the last turn) are counted and
their line numbers printed to stderr; nothing is dropped without a trace.
"""
import json
import os
import re
import sys

from .formats import numbered_jsonl

TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_dialogue(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    parts = TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if not msgs or any(a["role"] == b["role"] for a, b in zip(msgs, msgs[1:])):
        raise ValueError("turns do not alternate")
    return msgs


def convert(rec):
    """One HH record -> {"prompt", "chosen", "rejected"}; ValueError says why it cannot be parsed."""
    if not (isinstance(rec.get("chosen"), str) and isinstance(rec.get("rejected"), str)):
        raise ValueError("fields 'chosen' and 'rejected' must both be dialogue strings")
    chosen, rejected = parse_dialogue(rec["chosen"]), parse_dialogue(rec["rejected"])
    if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected differ before their last turn")
    if chosen[-1]["role"] != "assistant" or len(chosen) < 2:
        raise ValueError("the dialogue does not end with an assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def main(src, dst):
    out, skipped = [], []
    for n, rec in numbered_jsonl(src):
        try:
            out.append(convert(rec))
        except ValueError as e:
            skipped.append(n)
            print(f"{src}:{n}: skipped: {e}", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(dst, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    print(f"{src}: {len(out)} pairs written to {dst}, {len(skipped)} records skipped")
    return out, skipped


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m data.prepare_hh IN.jsonl[.gz] OUT.jsonl")
    main(sys.argv[1], sys.argv[2])
