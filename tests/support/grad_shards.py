"""Under torchrun: loop.accumulate over 3 micro-batches of a tiny sharded model; after each
non-final micro-batch's backward, whether any FSDP parameter holds an unsharded gradient (FSDP2
keeps one, fp32 and whole-model-sized, when the reduce-scatter is skipped). Writes JSON on rank 0.
    torchrun --nproc_per_node W grad_shards.py OUT.json HSDP"""
import json
import os
import sys

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
import config  # noqa: E402
import loop  # noqa: E402
import model as M  # noqa: E402

out, hsdp = sys.argv[1], int(sys.argv[2])
d = common.setup(config.TrainConfig(dtype="fp32", hsdp=hsdp, out=os.path.join(os.path.dirname(out), "o")))
cfg = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8)
net = M.Transformer(cfg)
net.init_weights(seed=0)
common.shard(net, d)
g = torch.Generator().manual_seed(d.rank)
ids = torch.randint(0, 64, (3, 2, 8), generator=g)
seen = []


def unsharded_grads():
    """Parameters whose gradient is not a dim-0 shard, and FSDP's own unsharded accumulators."""
    bad = [n for n, p in net.named_parameters()
           if p.grad is not None and not (isinstance(p.grad, DTensor) and isinstance(p.grad.placements[-1], Shard))]
    for m in net.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group  # private: where FSDP2 keeps unsharded gradients
            for fp in group.fsdp_params if group else []:  # in the reduce dtype, or (fp32) the unsharded param's own
                unsharded = getattr(fp, "_unsharded_param", None)
                if fp.unsharded_accumulated_grad is not None or (unsharded is not None and unsharded.grad is not None):
                    bad.append(f"{type(m).__name__}:{fp._param_fqn}")
    return bad


def loss(i, totals):
    if i > 0:  # the gradients the previous micro-batches left
        seen.append(unsharded_grads())
    logits = net(ids[i])
    return logits.float().logsumexp(-1).mean() / 3, {}


loop.accumulate(net, [0, 1, 2], d, 0, lambda i: {"rows": 1}, loss)
if d.rank == 0:
    with open(out, "w") as f:
        json.dump({"unsharded_after_micro_batch": seen, "grads": sum(p.grad is not None for p in net.parameters())}, f)
