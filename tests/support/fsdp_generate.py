"""Greedy generation with the model sharded by FSDP2 (under torchrun) or plain (one process);
each rank generates its own half of the prompts and rank 0 saves all results. Used by
test_train_ppo.py: both ways must give the same tokens."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
import config  # noqa: E402
import engine  # noqa: E402
import hf_io  # noqa: E402
from data import batching, chat  # noqa: E402

path, out = sys.argv[1], sys.argv[2]
d = common.setup(config.TrainConfig(dtype="fp32"))
tok = chat.load_tokenizer(path)
m = common.shard(hf_io.from_pretrained(path), d, train=False)
prompts = [chat.tokenize_prompt({"prompt": f"What is {a}+{b}?"}, tok, 64) for a, b in [(1, 2), (34, 56), (7, 89), (90, 9)]]
mine = prompts[d.rank::d.world]
ids, mask = batching.collate_prompts(mine + ([prompts[0]] if d.rank == 1 else []), tok.pad_id)  # ranks differ in batch and length
with common.unsharded(m):
    toks, cm, _ = engine.generate_ids(m, ids, mask, engine.Sampling(12, temperature=0), tok.stop_ids, tok.pad_id)
res = [(t[ids.shape[1]:].tolist(), c.tolist()) for t, c in zip(toks, cm)][:len(mine)]
if d.world > 1:
    parts = [None] * d.world
    dist.all_gather_object(parts, res)
    res = [x for i in range(len(prompts)) for x in [parts[i % d.world][i // d.world]]]
if d.rank == 0:
    comps = torch.full((len(res), 12), -1)
    masks = torch.zeros(len(res), 12, dtype=torch.long)
    for i, (c, k) in enumerate(res):
        comps[i, :len(c)], masks[i, :len(k)] = torch.tensor(c), torch.tensor(k)
    torch.save((comps, masks), out)
