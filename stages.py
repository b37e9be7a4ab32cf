"""
The built-in task's stage that samples: on-policy preference pairs judged by the task's verifier,
which DPO and the reward model start from (train_dpo.py, train_rm.py). The task's data, tokenizer
and verifier are data/task.py's.
"""
import torch

import collectives
import common
import engine
from data import chat, task


def sample_preference_pairs(policy, tok, records, dist, samples=8, seed=0, max_new_tokens=16, batch_size=256):
    """On-policy preference pairs, the way real pipelines make them: sample `samples` answers per
    prompt at temperature 1, judge each with the verifier, and pair distinct correct answers
    (chosen) with distinct wrong ones (rejected). Prompts are split over ranks and the pairs
    gathered, in prompt order, on every rank."""
    g = torch.Generator(dist.device).manual_seed(seed * 1000 + dist.rank)
    eng, sampling = engine.Engine(policy, tok, dist), engine.Sampling(max_new_tokens, temperature=1.0)
    mine = list(range(dist.rank, len(records), dist.world))
    per_batch = max(1, batch_size // samples)
    found = []
    with common.unsharded(policy):
        for i in range(0, len(mine), per_batch):
            chunk = mine[i:i + per_batch]
            prompts = [chat.tokenize_prompt(records[j], tok, 10**9) for j in chunk for _ in range(samples)]
            texts = eng.generate(prompts, sampling, g).texts
            for n, j in enumerate(chunk):
                answers = texts[n * samples:(n + 1) * samples]
                good = list(dict.fromkeys(a for a in answers if task.is_correct(a, records[j]["answer"])))
                bad = list(dict.fromkeys(a for a in answers if not task.is_correct(a, records[j]["answer"])))
                found += [(j, {"prompt": records[j]["prompt"], "chosen": c, "rejected": r}) for c, r in zip(good, bad)]
    found = [p for part in collectives.gather_objects(found, dist) for p in part]
    return [p for _, p in sorted(found, key=lambda x: x[0])]
