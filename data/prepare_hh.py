"""
Anthropic HH-RLHF -> our preference JSONL.

    python -m data.prepare_hh ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz runs/hh.jsonl
    python -m data.prepare_hh --held-out 400 ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz runs/hh   # train.jsonl, test.jsonl

Each HH record is {"chosen", "rejected"}, two whole dialogues "\\n\\nHuman: ...\\n\\nAssistant: ..."
that share every turn but the last assistant one. Output records are TRL's conversational form:
{"prompt": [messages ending with a user turn], "chosen": [assistant msg], "rejected": [assistant msg]}.
Records that cannot be parsed (e.g. the dialogues differ before the last turn) are counted and
their line numbers printed to stderr; nothing is dropped without a trace.

--held-out N writes a fixed split into the directory OUT instead: the pairs shuffled with seed
1234 (independent of any training seed), the first N in test.jsonl, the rest in train.jsonl.
"""
import json
import os
import random
import re
import sys

from .formats import numbered_jsonl

SPLIT_SEED = 1234
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


def main(src, dst, held_out=0):
    out, skipped = [], []
    for n, rec in numbered_jsonl(src):
        try:
            out.append(convert(rec))
        except ValueError as e:
            skipped.append(n)
            print(f"{src}:{n}: skipped: {e}", file=sys.stderr)
    lines = [json.dumps(r) + "\n" for r in out]
    files = {dst: lines}
    if held_out:
        # shuffled first: the file's order is not random, and a fixed seed gives every run the same split
        random.Random(SPLIT_SEED).shuffle(lines)
        files = {os.path.join(dst, "test.jsonl"): lines[:held_out], os.path.join(dst, "train.jsonl"): lines[held_out:]}
    for path, part in files.items():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(part)
    written = ", ".join(f"{len(part)} to {path}" for path, part in files.items())
    print(f"{src}: {len(out)} pairs written ({written}), {len(skipped)} records skipped")
    return out, skipped


if __name__ == "__main__":
    args, held_out = sys.argv[1:], 0
    if len(args) == 4 and args[0] == "--held-out" and args[1].isdigit():
        args, held_out = args[2:], int(args[1])
    if len(args) != 2 or args[0].startswith("-"):
        sys.exit("usage: python -m data.prepare_hh [--held-out N] IN.jsonl[.gz] OUT.jsonl (OUT_DIR with --held-out)")
    main(args[0], args[1], held_out)
