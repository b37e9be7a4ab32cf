"""
bf16 against fp32 on one model: the same batches through forward.token_logps, once under the
training scripts' bf16 autocast (one process: common.autocast) and once in fp32, the weights fp32 in
both. What a user gives up with --dtype auto on a GPU, measured rather than assumed.

    python bench/precision.py                                      # the tiny shape, random weights
    python bench/precision.py --shape qwen2.5-0.5b --seq-len 512   # one GPU
    python bench/precision.py --model runs/sft/model               # a trained model (its vocabulary)

Three layouts, as the scripts build them: right-padded SFT rows (causal, no mask), packed SFT rows
(block-diagonal mask) and DPO's shared-prompt rows (a [B, 1, T, T] mask). One JSON line each:
max and mean |delta log-prob| over the loss tokens, the loss in both dtypes and its delta (SFT: the
token-mean NLL; DPO: the summed log-prob of each sequence, the largest delta of any). On a CPU bf16
matmuls are emulated (~70x slower than fp32 on the dev machine): keep the shape tiny there.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import forward  # noqa: E402
import hf_io  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
from data import batching  # noqa: E402
from shapes import SHAPES  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="random weights of this shape")
p.add_argument("--model", default="", help="a Hugging Face model directory instead of --shape")
p.add_argument("--batch", type=int, default=4, help="rows (SFT) / pairs (DPO)")
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--chunk-size", type=int, default=256)
a = p.parse_args()

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if a.model:
    net = hf_io.from_pretrained(a.model, device=dev)
else:
    net = M.Transformer(M.ModelConfig.from_hf({"max_position_embeddings": 4 * a.seq_len, "rms_norm_eps": 1e-6,
                                               **SHAPES[a.shape]}))
    net.init_weights(seed=0)
    net.to(dev)
net.eval()
V, T, n = net.cfg.vocab_size, a.seq_len, a.batch
fp32, bf16 = common.Dist(0, 1, dev, None), common.Dist(0, 1, dev, torch.bfloat16)
g = torch.Generator().manual_seed(0)


def tokens(k):
    return torch.randint(4, V, (k,), generator=g).tolist()


# right-padded rows of T / 2 .. T tokens; packed rows of 3-4 documents each; pairs of prompt + 2 answers
lengths = torch.randint(T // 2, T + 1, (n,), generator=g).tolist()
padded = batching.collate_sft([{"input_ids": tokens(L), "loss_mask": [1] * L} for L in lengths], pad_id=0)
docs = [tokens(L) for L in torch.randint(T // 4, T // 3, (4 * n,), generator=g).tolist()]
packed = batching.pack_sft([{"input_ids": d, "loss_mask": [1] * len(d)} for d in docs], T, pad_id=0)
pairs = batching.collate_preference_shared([{"prompt_ids": tokens(T // 2), "chosen_ids": tokens(T // 2),
                                             "rejected_ids": tokens(T // 2)} for _ in range(n)], pad_id=0)

def logps(batch, dist, is_packed):
    # as common.setup sets it: fp32 matmuls left under bf16 autocast (the chunked head) run as TF32
    # on a GPU; the fp32 baseline keeps full fp32
    torch.set_float32_matmul_precision("high" if dist.autocast_dtype and dev.type == "cuda" else "highest")
    return forward.token_logps(net, batch, dist, a.chunk_size, packed=is_packed)


with torch.no_grad():
    for layout, batch, is_packed in (("sft_padded", padded, False), ("sft_packed", packed, True), ("dpo_shared_prompt", pairs, False)):
        (lp32, mask), (lp16, _) = (logps(batch, d, is_packed) for d in (fp32, bf16))
        sel = mask > 0
        delta = (lp16 - lp32).abs()[sel]
        if layout.startswith("sft"):
            loss32, loss16 = (losses.sft_loss(lp, mask, sel.sum()).item() for lp in (lp32, lp16))
            loss = {"loss_fp32": round(loss32, 6), "loss_bf16": round(loss16, 6), "loss_delta": float(f"{loss16 - loss32:.3g}")}
        else:  # DPO's loss reads each sequence's summed log-prob: the largest delta of any
            seq32, seq16 = (lp32 * mask).sum(-1), (lp16 * mask).sum(-1)
            loss = {"seq_logp_fp32_mean": round(seq32.mean().item(), 4), "seq_logp_max_delta": float(f"{(seq16 - seq32).abs().max().item():.3g}")}
        print(json.dumps({"layout": layout, "model": a.model or a.shape, "device": str(dev), "tokens": int(sel.sum()),
                          "max_abs_delta_logp": float(f"{delta.max().item():.3g}"),
                          "mean_abs_delta_logp": float(f"{delta.mean().item():.3g}"), **loss}), flush=True)
