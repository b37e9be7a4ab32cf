"""Under torchrun: the collectives FSDP2 issues in one optimizer step (the second, so that first-use
gathers are not counted), recorded by wrapping torch.distributed's all_gather_single,
reduce_scatter_single and all_reduce; only calls made from torch.distributed.fsdp count (not
nanotrl's own metric sums). Writes {"collectives": [[op, input bytes, output bytes, group, calls]]}.
    torchrun --nproc_per_node W measure_comm.py MODEL_DIR OUT.json MODE HSDP GRAD_ACCUM
MODE: full | lora | qlora | dpo (full fine-tuning beside a frozen reference)."""
import json
import os
import sys
import traceback
from collections import Counter

import torch
import torch.distributed as td

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
import config  # noqa: E402
import forward  # noqa: E402
from data import batching  # noqa: E402

calls = Counter()


def recording(name):
    original = getattr(td, name)

    def call(*args, **kw):
        if any("/distributed/fsdp/" in frame.filename for frame in traceback.extract_stack()):
            if name == "all_reduce":
                inp = out = args[0] if args else kw["tensor"]
            else:
                out = kw.get("output_tensor", kw.get("output")) if not args else args[0]
                inp = kw.get("input_tensor", kw.get("input")) if len(args) < 2 else args[1]
            calls[(name.removesuffix("_single"), inp.numel() * inp.element_size(), out.numel() * out.element_size(),
                   td.get_world_size(kw.get("group")))] += 1
        return original(*args, **kw)
    return call


for op in ("all_gather_single", "reduce_scatter_single", "all_reduce"):
    setattr(td, op, recording(op))

path, result, mode, hsdp, accum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cfg = config.TrainConfig(dtype="fp32", out=os.path.dirname(result), hsdp=hsdp, lora_r=4 if "lora" in mode else 0,
                         quantize="nf4" if mode == "qlora" else "")
d = common.setup(cfg)
policy = common.load_model(path, cfg, d, adapt=True)
ref = common.load_model(path, cfg, d, train=False) if mode == "dpo" else None
opt = common.make_optimizer(policy, cfg)
g = torch.Generator().manual_seed(d.rank)
for step in range(2):
    calls.clear()
    for i in range(accum):
        if d.mesh is not None:  # as loop.accumulate: reduce-scatter every micro-batch, HSDP's all-reduce once
            policy.set_requires_all_reduce(i == accum - 1)
        batch = batching.collate_sft([{"input_ids": torch.randint(4, 30, (9,), generator=g).tolist(),
                                       "loss_mask": [1] * 9} for _ in range(2)], 0)
        logps, mask = forward.token_logps(policy, batch, d, 4)
        if ref is not None:
            with torch.no_grad():
                forward.token_logps(ref, batch, d, 4)
        (logps * mask).sum().backward()
    opt.step()
    opt.zero_grad()
if d.main:
    with open(result, "w") as f:
        json.dump({"collectives": [[*k, n] for k, n in sorted(calls.items())]}, f)
