"""
Loading a real checkpoint: hf_io.from_pretrained and the scripts' streamed common.load_model
against transformers' AutoModelForCausalLM.from_pretrained, interleaved in one process (medians).

    python bench/load.py                         # SmolLM2-135M-Instruct (fp32 safetensors)

The file is in the page cache after the first round. Both ours and transformers' map fp32 tensors
from the file instead of copying them, so each is also timed with a first forward of 8 x 16
tokens after the load (`*_then_forward_s`), which pays for reading the mapped pages. Loading
into the file's dtype is bit-identical to the file (`identical` checks every tensor against
transformers'). Prints one JSON line.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import config  # noqa: E402
import hf_io  # noqa: E402
from timing import DEFAULT_MODEL, interleaved, machine  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", default=DEFAULT_MODEL, help="a Hugging Face model directory")
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

import transformers  # noqa: E402

cfg = config.TrainConfig(dtype="fp32")
dist = common.setup(cfg)
ids = torch.randint(4, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def ours():
    return hf_io.from_pretrained(a.model)


def ours_streamed():
    return common.load_model(a.model, cfg, dist)


def hf():
    return transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)


def then_forward(load):
    def fn():
        m = load()
        with torch.no_grad():
            m(ids)
    return fn


t = interleaved({"ours": ours, "ours_streamed": ours_streamed, "transformers": hf,
                 "ours_then_forward": then_forward(ours), "transformers_then_forward": then_forward(hf)}, a.repeats)
mine, theirs = ours().state_dict(), hf().state_dict()
identical = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
rec = {k + "_s": round(v, 4) for k, v in t.items() if not k.endswith("_all")}
rec.update({"ratio_ours_over_transformers": round(t["ours"] / t["transformers"], 3),
            "ratio_streamed_over_transformers": round(t["ours_streamed"] / t["transformers"], 3),
            "ratio_then_forward": round(t["ours_then_forward"] / t["transformers_then_forward"], 3),
            "identical": identical, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "machine": machine()})
print(json.dumps(rec), flush=True)
