"""Streamed loading and saving under torchrun (or one process): loads `path` with
common.load_model (plain, then QLoRA: NF4 base + rank-4 adapters with B set to 0.01 so they
matter), saves rank 0's logits of a fixed batch, each rank's bytes held in parameters, and the
merged model through the streamed save. Used by test_qlora.py."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import checkpoint  # noqa: E402
import common  # noqa: E402
import config  # noqa: E402
import lora  # noqa: E402
import hf_io  # noqa: E402

path, out, double_quant = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
hf_io.READ_BYTES = 300  # every matrix read in many row slices, as a big checkpoint's are
cfg = config.TrainConfig(dtype="fp32", out=out)
d = common.setup(cfg)
ids = torch.randint(1, 30, (2, 9), generator=torch.Generator().manual_seed(0))


def local_bytes(m):
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in m.parameters())


result = {}
plain = common.load_model(path, cfg, d, train=False)
result["plain_bytes"] = local_bytes(plain)  # before forward: the root keeps its gathered params after it
with torch.no_grad():
    result["plain"] = plain(ids).tolist()
del plain
qcfg = config.TrainConfig(dtype="fp32", out=out, quantize="nf4", double_quant=double_quant, lora_r=4, lora_alpha=8)
q = common.load_model(path, qcfg, d, adapt=True)
result["qlora_bytes"] = local_bytes(q)
with torch.no_grad():
    for _, m in lora.lora_layers(q):
        m.lora_B.weight.fill_(0.01)  # elementwise: the same on every shard
    result["qlora"] = q(ids).tolist()
checkpoint.save_final(q, qcfg, d, None, path)
chunks = checkpoint.hf_state_chunks(q, d)  # again, into small shard files
if d.main:
    hf_io.save_pretrained(q, os.path.join(out, "sharded"), state_dict=chunks, max_shard_bytes=200_000)
for _ in chunks:
    pass
if d.main:
    with open(os.path.join(out, f"result_{d.world}.json"), "w") as f:
        json.dump(result, f)
