"""
GSM8K -> our SFT and RL JSONL, and the math-answer reward function for GRPO/PPO.

    python -m data.prepare_gsm8k ../shared/data/gsm8k-train.jsonl.gz runs/gsm8k   # writes sft.jsonl, rl.jsonl

sft.jsonl: {"prompt": question, "completion": worked solution ending "#### N"} (calculator
annotations <<a*b=c>> removed); rl.jsonl: {"prompt": question, "answer": "N"}.
Use:  train_ppo.py --data runs/gsm8k/rl.jsonl --reward-fn data.prepare_gsm8k:gsm8k_reward
"""
import json
import os
import re
import sys

from .formats import DataError, numbered_jsonl

CALC = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(solution):
    """The number after GSM8K's '####' marker, commas removed: "1,234" -> "1234"."""
    return solution.split("####")[-1].strip().replace(",", "")


def _number(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def gsm8k_reward(prompts, completions, answer, **_):
    """1.0 when the completion's final answer equals the reference, else 0.0. The final answer is
    the first number after the last "####" (the format of the SFT data), or else the last number."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        nums = NUMBER.findall(c.rsplit("####", 1)[1])[:1] if "####" in c else NUMBER.findall(c)
        got, want = (_number(nums[-1]) if nums else None), _number(str(a))
        out.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return out


def main(src, dst_dir):
    os.makedirs(dst_dir, exist_ok=True)
    recs = numbered_jsonl(src)
    with open(os.path.join(dst_dir, "sft.jsonl"), "w") as sft, open(os.path.join(dst_dir, "rl.jsonl"), "w") as rl:
        for n, r in recs:
            for key in ("question", "answer"):
                if not isinstance(r.get(key), str):
                    raise DataError(f"{src}:{n}: field {key!r}: expected a string, got {type(r.get(key)).__name__}")
            if "####" not in r["answer"]:
                raise DataError(f"{src}:{n}: field 'answer': no '#### <number>' final answer")
            sft.write(json.dumps({"prompt": r["question"], "completion": CALC.sub("", r["answer"])}) + "\n")
            rl.write(json.dumps({"prompt": r["question"], "answer": final_answer(r["answer"])}) + "\n")
    print(f"{src}: {len(recs)} records -> {dst_dir}/sft.jsonl, {dst_dir}/rl.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m data.prepare_gsm8k IN.jsonl[.gz] OUT_DIR")
    main(sys.argv[1], sys.argv[2])
