"""
The built-in task: integer addition, "What is 347+589?" -> "936".

Why this task: the answer is verifiable exactly (exact match is the metric and the RL reward), a
~1M-parameter model learns it from scratch in minutes on a laptop CPU, and it is hard enough in
the way that matters: the answer is written most-significant digit first, so the first digit
already depends on carries from the right. The SFT model gets most problems right and fails
some carry chains, which leaves DPO and RL a measurable gain to make. Character-level tokens
keep the tokenizer trivial and every digit its own prediction.

ensure_task(dir) writes, deterministically: train.jsonl / test.jsonl (disjoint problems;
{"prompt", "completion", "answer"} records usable for SFT, preference sampling and RL),
tokenizer.json + tokenizer_config.json (the plain chat format), and config.json (a tiny Llama).
"""
import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

TASK_DIR = "runs/task"
MAX_DIGITS = 2          # operands have 1..MAX_DIGITS digits (digit count drawn uniformly)
N_TRAIN, N_TEST = 4000, 500
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
    a, b = (rng.randint(0, 10 ** rng.randint(1, MAX_DIGITS) - 1) for _ in range(2))
    return f"What is {a}+{b}?", str(a + b)


def examples(n_train=None, n_test=None, seed=SEED):
    """Disjoint train and test problems, deterministic for a seed."""
    n_train, n_test = n_train or N_TRAIN, n_test or N_TEST
    if n_train + n_test > 0.5 * (10 ** MAX_DIGITS) ** 2:
        raise ValueError(f"{n_train + n_test} distinct problems asked of {MAX_DIGITS}-digit operands: too few exist")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n_train + n_test:
        prompt, answer = problem(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "completion": answer, "answer": answer})
    return out[:n_train], out[n_train:]


def ensure_task(path=TASK_DIR):
    """Write the task's files into `path` if they are missing; return `path`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    train, test = examples()
    for name, recs in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(tmp, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    build_tokenizer().save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
                   "pad_token": "<|pad|>", "unk_token": "<|unk|>", "model_max_length": 256}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f, indent=2)
    try:  # several processes may race here (torchrun): the first rename wins, the rest clean up
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.rename(tmp, path)
    except OSError:
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)
    return path


def is_correct(completion: str, answer: str) -> bool:
    """Exact match: the completion is the answer and nothing else (surrounding spaces aside)."""
    return completion.strip() == str(answer).strip()


def reward_fn(prompts, completions, answer, **_):
    """RL reward: 1.0 for an exactly correct answer, else 0.0."""
    return [float(is_correct(c, a)) for c, a in zip(completions, answer)]
