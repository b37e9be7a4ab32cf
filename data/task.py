"""
The built-in task: two-digit addition, "What is 47+85?" -> "132", learned from a flawed teacher.

Why this task: the answer is verifiable exactly (exact match is the metric and the RL reward), a
~1M-parameter model learns it from scratch in about a minute on a laptop CPU, and the answer is
written most-significant digit first, so its first digits already depend on the carry from the
units. Character-level tokens keep the tokenizer trivial and every digit its own prediction; the
words of the prompt go through the "plain" chat format, so the chat path is exercised too.

Why the SFT demonstrations are flawed: they come from a teacher that forgets the units carry
3 times in 4 (47+85 -> "122"; every record's "answer" field holds the truth, which the verifier
uses). Supervised fine-tuning imitates its teacher, so the SFT model converges to the teacher's
habit: it gets the problems without a units carry right (~59% of them) and, greedily, only some
with one. That level is set by the data, not by where a still-learning run happens to stop, so
it moves little with the seed, the number of processes or the machine. Imitation cannot
fix it but the verifier can: sampled answers to carry problems are right about 1 time in 4, which
gives DPO its (correct, wrong) pairs and GRPO/PPO their reward signal. Held-out records
(test.jsonl) carry the true answer as their completion, so eval/loss is measured against the truth.

Knobs: DIGITS (operand length), TEACHER_FORGETS_CARRY (0 = a perfect teacher; SFT alone then
reaches ~95%+ and leaves DPO/RL little to do), N_TRAIN / N_TEST. Changing a knob changes the files:
delete TASK_DIR so ensure_task writes them again.

ensure_task(dir) writes, deterministically: train.jsonl / test.jsonl (disjoint problems;
{"prompt", "completion", "answer"} records usable for SFT, preference sampling and RL),
train_tools.jsonl (train.jsonl with every 3rd demonstration calling agent.py's calculator),
tokenizer.json + tokenizer_config.json (the plain chat format), and config.json (a tiny Llama).
"""
import json
import os
import random
import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

TASK_DIR = "runs/task"
DIGITS = 2                   # both operands have exactly this many digits
TEACHER_FORGETS_CARRY = 0.75  # how often a training demonstration drops the units carry
N_TRAIN, N_TEST = 4000, 500
TOOL_DEMOS = 3               # train_tools.jsonl: every 3rd demonstration calls the calculator instead
SEED = 1234
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # printable ASCII: any short English prompt works

MODEL_CONFIG = {  # a tiny Llama (~0.9M parameters)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(SPECIALS) + len(CHARS),
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
}


def build_tokenizer() -> Tokenizer:
    """Character-level: every character is one token; decoding concatenates them."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)
    return tk


def problem(rng):
    """(prompt, true answer, the teacher's demonstration)."""
    a, b = (rng.randint(10 ** (DIGITS - 1), 10 ** DIGITS - 1) for _ in range(2))
    forgets = a % 10 + b % 10 >= 10 and rng.random() < TEACHER_FORGETS_CARRY
    return f"What is {a}+{b}?", str(a + b), str(a + b - 10 * forgets)


def examples(n_train=None, n_test=None, seed=SEED):
    """Disjoint train and test problems, deterministic for a seed. Training completions are the
    teacher's demonstrations; test completions are the true answers."""
    n_train, n_test = n_train or N_TRAIN, n_test or N_TEST
    if n_train + n_test > 0.75 * (9 * 10 ** (DIGITS - 1)) ** 2:  # rejection sampling must stay quick
        raise ValueError(f"{n_train + n_test} distinct problems asked of {DIGITS}-digit operands: too few exist")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n_train + n_test:
        prompt, answer, demo = problem(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "completion": demo if len(out) < n_train else answer, "answer": answer})
    return out[:n_train], out[n_train:]


def _write(path, name, text):
    # Write-then-rename: torchrun processes may all get here at once, and a reader must never
    # see half a file. They write identical bytes, so whichever rename lands last is harmless.
    tmp = os.path.join(path, f".{name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(path, name))


def tool_demos(train):
    """train_tools.jsonl's records: train.jsonl's, where every TOOL_DEMOS-th demonstration calls
    agent.py's calculator and copies its result (the others keep the flawed teacher's carries)."""
    out = []
    for i, r in enumerate(train):
        if i % TOOL_DEMOS:
            out.append(r)
            continue
        call = {"name": "calculator", "arguments": {"expression": r["prompt"].removeprefix("What is ").rstrip("?")}}
        out.append({"messages": [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": f"<tool_call>{json.dumps(call)}</tool_call>"},
                                 {"role": "tool", "name": "calculator", "content": r["answer"]},
                                 {"role": "assistant", "content": r["answer"]}], "answer": r["answer"]})
    return out


def ensure_task(path=TASK_DIR):
    """Write the task's files into `path` if they are missing (config.json, written last, marks a
    complete directory); return `path`. Deterministic: the same bytes on every machine and call."""
    if os.path.exists(os.path.join(path, "config.json")):
        if not os.path.exists(os.path.join(path, "train_tools.jsonl")):  # a directory from before it existed
            _write(path, "train_tools.jsonl", "".join(json.dumps(r) + "\n" for r in tool_demos(examples()[0])))
        return path
    os.makedirs(path, exist_ok=True)
    train, test = examples()
    for name, recs in (("train.jsonl", train), ("test.jsonl", test), ("train_tools.jsonl", tool_demos(train))):
        _write(path, name, "".join(json.dumps(r) + "\n" for r in recs))
    _write(path, "tokenizer.json", build_tokenizer().to_str(pretty=True))
    _write(path, "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
         "pad_token": "<|pad|>", "unk_token": "<|unk|>", "model_max_length": 256}, indent=2))
    _write(path, "config.json", json.dumps(MODEL_CONFIG, indent=2))
    return path


def extract_answer(completion: str):
    """The integer a completion states, or None. Strict on purpose: the completion must be just
    the number (surrounding spaces aside), so "936 is it" or "9 3 6" earn nothing in RL."""
    m = re.fullmatch(r"\s*(-?\d+)\s*", completion)
    return m.group(1) if m else None


def is_correct(completion: str, answer) -> bool:
    """Exact match of the stated number with the answer ("0936" is not "936")."""
    return extract_answer(completion) == str(answer).strip()


def reward_fn(prompts, completions, answer, **_):
    """RL reward, signature reward_fn(prompts, completions, **fields) with fields aligned to
    prompts (here `answer`): 1.0 for an exactly correct answer, else 0.0."""
    return [float(is_correct(c, a)) for c, a in zip(completions, answer, strict=True)]


# ----------------------------------------------------------------------------- the task's stages
# The stage order lives in quickstart.sh: SFT first (from scratch), then DPO, the reward model and
# RL from the SFT model, then distillation from the GRPO model. No script runs another: a stage
# whose input is missing stops with the command that makes it (stage).

SFT_MODEL = "runs/sft/model"      # train_sft.py's; DPO, the reward model and RL start from it
SFT_BASE = "runs/sft_base/model"  # a short full fine-tuning run, the base that --lora-r SFT adapts
GRPO_MODEL = "runs/ppo/model"     # train_ppo.py's; distillation's teacher
MAKES = {SFT_MODEL: "python train_sft.py", SFT_BASE: "python train_sft.py --max-steps 300 --out runs/sft_base",
         GRPO_MODEL: "python train_ppo.py"}


def stage(path, what):
    """The model directory an earlier stage saved at `path`. If it is missing the run stops before
    writing anything and says which command makes it (no script runs another)."""
    if not os.path.exists(os.path.join(path, "config.json")):
        # FileNotFoundError: a user's mistake, one line (common.run); data/ imports nothing above it
        raise FileNotFoundError(f"no {what} at {path}: make it first with `{MAKES[path]}` (or pass its flag)")
    return path
