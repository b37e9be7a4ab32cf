"""Host-device synchronisation, audited on the CPU: a TorchFunctionMode counts every call that
makes the host wait for a GPU (item, tolist, bool/int/float of a tensor, nonzero, boolean-mask
indexing) in a decode step and in a micro-batch, against a budget; it also flags a masked
attention call with fewer KV heads than query heads (on CUDA the math kernel: model.attend) and a
.to(device) inside a forward (a host-to-device copy on a GPU, a no-op here). The CUDA policies are switched on for the audit (engine's
DONE_CHECK_EVERY, model's gqa_masked_path), so the CPU runs the code paths a GPU would."""
import collections
import copy
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import common
import engine
import model as M
import train_ppo

SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.any, torch.Tensor.all}


class Audit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.syncs, self.where = collections.Counter(), collections.Counter()
        self.fallbacks = self.moves = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SYNCS and not (func in (torch.Tensor.any, torch.Tensor.all)):
            self.syncs[func.__name__] += 1
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(torch.is_tensor(i) and i.dtype == torch.bool for i in index):
                self.syncs["bool_index"] += 1
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.fallbacks += mask is not None and q.shape[1] != k.shape[1]
        elif func is torch.Tensor.to and torch.is_tensor(args[0]):
            dev = next((a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, (torch.device, str))), None)
            # inside a model's forward: a copy to the GPU per call on CUDA (on the CPU, a no-op that would be one there)
            self.moves += dev is not None and any(f.filename == M.__file__ for f in traceback.extract_stack())
        return out


def cuda_policies(monkeypatch):
    monkeypatch.setitem(engine.DONE_CHECK_EVERY, "cpu", engine.DONE_CHECK_EVERY["cuda"])
    monkeypatch.setattr(M, "gqa_masked_path", lambda q, T: "fold" if T <= M.FOLD_MAX_T else "expand")


def tiny(seed=0):
    cfg = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
    m = M.Transformer(cfg)
    m.init_weights(seed=seed)
    return m


def test_decoding_waits_for_the_device_once_per_eight_tokens(monkeypatch):
    """24 tokens after left-padded prompts: the prefill's real positions (one nonzero), whether
    every row has stopped every 8th token (3), the trim of the steps past the last live one (1);
    no masked attention call would fall back to the math kernel and nothing moves devices."""
    cuda_policies(monkeypatch)
    net = tiny().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[3, :5] = 0
    with Audit() as audit:
        engine.generate_ids(net, ids * mask, mask, engine.Sampling(24), stop_ids=[], generator=g)
    assert sum(audit.syncs.values()) <= 1 + 3 + 1, audit.syncs
    assert audit.fallbacks == 0 and audit.moves == 0


def test_the_audit_sees_what_it_counts(monkeypatch):
    """The auditor itself: the CPU policy (read `done` every token) and SDPA's own GQA with a mask
    are what it must flag."""
    net = tiny().eval()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    monkeypatch.setitem(engine.DONE_CHECK_EVERY, "cpu", 1)
    with Audit() as audit:
        engine.generate_ids(net, ids * mask, mask, engine.Sampling(12), stop_ids=[])
    assert audit.syncs["__bool__"] >= 11 and audit.fallbacks >= 11 * 2  # every token, every layer
    with Audit() as audit:
        t = torch.tensor([1.0, -1.0])
        t[t > 0]
    assert audit.syncs["bool_index"] == 1


def grpo_update_syncs(grad_accum, monkeypatch, algo="grpo"):
    """Syncs of one GRPO (or PPO) update of 16 rows (4 prompts x 4) in `grad_accum` micro-batches."""
    cuda_policies(monkeypatch)
    g = torch.Generator().manual_seed(0)
    P, L, B, G = 6, 5, 4, 4
    prompts = torch.randint(1, 64, (B, P), generator=g).repeat_interleave(G, 0)
    seqs = torch.cat([prompts, torch.randint(1, 64, (B * G, L), generator=g)], 1)
    cmask = (torch.arange(L)[None] < torch.tensor([L, 2, L, 1] * B)[:, None]).long()
    s = engine.Samples(seqs, torch.cat([torch.ones(B * G, P, dtype=torch.long), cmask], 1), cmask.float(), P,
                       [""] * (B * G), cmask[:, -1].bool(), group=G)
    cfg = train_ppo.PPOConfig(minibatches=1, ppo_epochs=1, grad_accum=grad_accum, beta=0.1, group_size=G, lr=1e-2,
                              max_new_tokens=L, algo=algo)
    dist = common.Dist(0, 1, torch.device("cpu"), None)
    policy = tiny(0)
    critic = None
    if algo == "ppo":
        critic = M.Transformer(copy.deepcopy(policy.cfg), head="score")
        critic.init_weights(seed=1)
    rl = train_ppo.RL(cfg, dist, None, None, policy, common.make_optimizer(policy, cfg), ref=tiny(1).requires_grad_(False),
                      critic=critic, vopt=common.make_optimizer(critic, cfg) if critic else None,
                      kl_in_reward=algo == "ppo")
    r = train_ppo.advantages(rl, s, torch.rand(B * G, generator=g), torch.rand(B * G, generator=g))
    with Audit() as audit:
        train_ppo.update(rl, r, 0)
    return audit


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_micro_batch_does_not_wait_for_the_device(monkeypatch, algo):
    """The update's syncs do not grow with the number of micro-batches: the step's counts and
    metrics are read once (loop.accumulate), the shared-prompt rows are not re-checked, and no
    masked attention call would fall back."""
    two, four = grpo_update_syncs(2, monkeypatch, algo), grpo_update_syncs(4, monkeypatch, algo)
    assert sum(four.syncs.values()) == sum(two.syncs.values()), (two.syncs, four.syncs)
    assert sum(two.syncs.values()) <= 8 and two.fallbacks == 0 and two.moves == 0, two.syncs


def test_frozen_weights_and_the_kv_cache_take_the_compute_dtype():
    """One GPU under bf16 autocast (item 7), checked on the CPU: common.cast_frozen stores a frozen
    model's weights in bf16 once (not NF4's constants, not trainable weights), and the KV cache
    takes autocast's dtype, the one SDPA would cast K/V to."""
    import nf4
    net = tiny()
    net.model.layers[0].mlp.up_proj = nf4.NF4Linear(net.model.layers[0].mlp.up_proj)
    net.requires_grad_(False)
    net.lm_head.weight.requires_grad_(True)
    common.cast_frozen(net, torch.bfloat16)
    assert net.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert net.model.norm.weight.dtype == torch.bfloat16 and net.lm_head.weight.dtype == torch.float32
    assert all(p.dtype in (torch.uint8, torch.float32) for p in net.model.layers[0].mlp.up_proj.parameters())
    fp32 = tiny()
    assert engine.cache_dtype(fp32, "cpu") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine.cache_dtype(fp32, "cpu") == torch.bfloat16
