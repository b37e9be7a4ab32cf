"""
One-digit arithmetic -> RL prompt JSONL, and its exact-match reward function.

    python -m data.prepare_arith runs/arith              # writes train.jsonl, test.jsonl
    python -m data.prepare_arith --tools runs/arith2     # two-digit additions for --tools agent:calculator

Every problem a+b and a*b with a, b in 0..9 (100 of each), as a chat prompt
{"prompt": [{"role": "user", "content": "What is 3+5? Answer with the number only."}], "answer": "8", "op": "+"}.
The split is fixed (a seeded shuffle per operation, independent of any training seed): 50
additions and 50 products held out in test.jsonl, the other 100 problems in train.jsonl. The
two files never share a prompt; "3+5" may be in one and "5+3" in the other.

Use:  train_ppo.py --data runs/arith/train.jsonl --reward-fn data.prepare_arith:reward

--tools writes two-digit additions a+b (a, b in 10..99; 256 for training, 64 held out, a fixed
seeded draw), asked as "What is 47+85?". Each prompt first shows one worked exchange with the
calculator (a user question, the assistant's <tool_call>, the tool's result, the answer), the
in-context example a small model needs to use the format at all; plain.jsonl holds the held-out
questions alone, for the no-tool baseline.
"""
import json
import os
import random
import re
import sys

PHRASING = "What is {a}{op}{b}? Answer with the number only."
OPS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}
SPLIT_SEED = 1234
N_TEST = 50  # held-out problems per operation
INTEGER = re.compile(r"-?\d+")


def first_integer(completion: str):
    """The first integer written in a completion ("The answer is 8." -> "8"), or None. The first,
    not the last: a completion that restates the question ("3+5 = 8") states 3 first, and the
    prompt asks for the number only."""
    m = INTEGER.search(completion)
    return m.group(0) if m else None


def last_integer(completion: str):
    """The last integer of a completion, or None: a lenient reading, to tell knowing the answer
    from stating it in the asked format (reported beside the first-integer accuracy)."""
    found = INTEGER.findall(completion)
    return found[-1] if found else None


def is_correct(completion: str, answer) -> bool:
    """The first integer of the completion equals the answer."""
    return first_integer(completion) == str(answer).strip()


def reward(prompts, completions, answer, **_):
    """train_ppo.py's --reward-fn: 1.0 when the completion's first integer is the answer, else 0.0."""
    return [float(is_correct(c, a)) for c, a in zip(completions, answer, strict=True)]


def problems(op):
    return [{"prompt": [{"role": "user", "content": PHRASING.format(a=a, op=op, b=b)}],
             "answer": str(OPS[op](a, b)), "op": op} for a in range(10) for b in range(10)]


def split(n_test=N_TEST, seed=SPLIT_SEED):
    """(train, test) records: per operation a fixed shuffle, its first n_test held out."""
    train, test = [], []
    for op in OPS:
        recs = problems(op)
        random.Random(f"{seed}{op}").shuffle(recs)
        test += recs[:n_test]
        train += recs[n_test:]
    return train, test


TOOL_EXAMPLE = [  # one worked exchange; 12+34 itself is left out of the draws below
    {"role": "user", "content": "What is 12+34?"},
    {"role": "assistant", "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "12+34"}}</tool_call>'},
    {"role": "tool", "content": "46"},
    {"role": "assistant", "content": "46"}]


def split_two_digit(n_train=256, n_test=64, seed=SPLIT_SEED):
    """(train, test, plain test) records of distinct two-digit additions, never 12+34."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if (a, b) != (12, 34)]
    random.Random(f"{seed}two-digit").shuffle(pairs)

    def rec(a, b, example):
        return {"prompt": example + [{"role": "user", "content": f"What is {a}+{b}?"}], "answer": str(a + b), "op": "+"}
    test = pairs[:n_test]
    return ([rec(a, b, TOOL_EXAMPLE) for a, b in pairs[n_test:n_test + n_train]],
            [rec(a, b, TOOL_EXAMPLE) for a, b in test], [rec(a, b, []) for a, b in test])


def main(dst_dir, tools=False):
    os.makedirs(dst_dir, exist_ok=True)
    files = dict(zip(("train.jsonl", "test.jsonl", "plain.jsonl"), split_two_digit())) if tools else \
        dict(zip(("train.jsonl", "test.jsonl"), split()))
    train, test = files["train.jsonl"], files["test.jsonl"]
    for name, recs in files.items():
        with open(os.path.join(dst_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    print(f"{len(train)} training and {len(test)} held-out problems -> {dst_dir}/train.jsonl, {dst_dir}/test.jsonl")


if __name__ == "__main__":
    args = [x for x in sys.argv[1:] if x != "--tools"]
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m data.prepare_arith [--tools] OUT_DIR")
    main(args[0], tools="--tools" in sys.argv)
