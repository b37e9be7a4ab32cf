"""train_ppo's one-optimizer-step-per-rollout path: the update's own forward supplies the old
log-probs (train_ppo.old_logps_from_update) instead of a separate forward in advantages(). The
step must equal the one with that forward, up to fp32 rounding of a second forward."""

import pytest
import torch

import common
import engine
import model as M
import train_ppo


def tiny_policy(seed):
    cfg = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
    m = M.Transformer(cfg)
    m.init_weights(seed=seed)
    return m


def samples(n=8, P=5, L=4):
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, 64, (n, P + L), generator=g)
    pmask = torch.ones(n, P, dtype=torch.long)
    pmask[::2, :2] = 0  # left padding on every other row
    seqs[:, :P] *= pmask
    cmask = torch.ones(n, L, dtype=torch.long)
    cmask[1::3, 2:] = 0  # some completions end early
    return engine.Samples(seqs, torch.cat([pmask, cmask], 1), cmask.float(), P, [""] * n, cmask[:, -1].bool())


@pytest.mark.parametrize("beta,grad_accum", [(0.0, 1), (0.1, 2)])
def test_old_logps_from_the_update_equal_a_separate_forward(monkeypatch, beta, grad_accum):
    cfg = train_ppo.PPOConfig(minibatches=1, ppo_epochs=1, grad_accum=grad_accum, beta=beta, group_size=4, lr=1e-2,
                              max_new_tokens=4)
    dist = common.Dist(0, 1, torch.device("cpu"), None)
    s = samples()
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    ref = tiny_policy(1).requires_grad_(False) if beta else None
    results = []
    for deferred in (False, True):
        monkeypatch.setattr(train_ppo, "old_logps_from_update", lambda *_: deferred)
        policy = tiny_policy(0)
        opt = common.make_optimizer(policy, cfg)
        grads, step = {}, opt.step

        def recording_step(*args, **kwargs):  # the gradients the optimizer steps on
            grads.update({k: p.grad.clone() for k, p in policy.named_parameters()})
            return step(*args, **kwargs)
        opt.step = recording_step
        rl = train_ppo.RL(cfg, dist, None, None, policy, opt, ref=ref)
        r = train_ppo.advantages(rl, s, scores, scores)
        assert (r.old_logps is None) == deferred and (r.ref_logps is None) == (ref is None)
        stats, seen = train_ppo.update(rl, r, 0)
        assert (seen is None) != deferred
        old, entropy = (seen["logps"], seen["entropy"]) if deferred else (r.old_logps, r.entropy)
        results.append((old, entropy, stats, grads))
    (oa, ea, sa, ga), (ob, eb, sb, gb) = results
    m = s.mask.bool()
    assert torch.allclose(oa[m], ob[m], atol=1e-5) and torch.allclose(ea[m], eb[m], atol=1e-5)
    assert sa.keys() == sb.keys() and all(abs(sa[k] - sb[k]) < 1e-4 for k in sa)
    # gradients, not the weights after AdamW: its first step is lr * sign(g), which turns the ~1e-7
    # ratio noise of a separate forward on a near-zero gradient into a whole lr (flaky at 2 threads)
    assert ga.keys() == {k for k, _ in tiny_policy(0).named_parameters()}
    assert all((ga[k] - gb[k]).abs().max() <= 1e-5 * ga[k].abs().max() for k in ga)
    assert sum(g.abs().sum() for g in ga.values()) > 0


def test_deferred_only_with_one_optimizer_step_per_rollout():
    f = train_ppo.old_logps_from_update
    ref = object()
    assert f(train_ppo.PPOConfig(minibatches=1, ppo_epochs=1), False, ref)
    assert f(train_ppo.PPOConfig(minibatches=1, ppo_epochs=1, grad_accum=4), False, None)
    assert not f(train_ppo.PPOConfig(minibatches=2, ppo_epochs=1), False, None)
    assert not f(train_ppo.PPOConfig(minibatches=1, ppo_epochs=2), False, None)
    assert not f(train_ppo.PPOConfig(minibatches=1, ppo_epochs=1), True, ref)  # the KL in the reward needs them first
