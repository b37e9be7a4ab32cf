"""GRPO's log-prob forwards with each group's prompt computed once (forward.shared_prompt_rows,
--share-prompt): the same log-probs, entropies, gradients and optimizer step as one row per
completion. An fp64 model where the claim is exactness: its log-probs agree to 1e-10 (summation
order); its gradients to fp32 rounding (1e-6 relative), since RMSNorm computes in fp32 whatever the
dtype, as transformers' does. The optimizer step in fp32: 1e-6."""
import pytest
import torch

import common
import engine
import forward
import model as M
import train_ppo

DIST = common.Dist(0, 1, torch.device("cpu"), None)


def tiny(seed, **arch):
    cfg = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=64, **arch)
    m = M.Transformer(cfg)
    m.init_weights(seed=seed)
    return m


def grouped(B=4, G=4, P=6, L=5):
    """B prompts (left-padded by 0, 1, 2, ... tokens) x G completions (some end early)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 64, (B, P), generator=g)
    pmask = (torch.arange(P)[None] >= torch.arange(B)[:, None] % 3).long()
    seqs = torch.cat([(prompts * pmask).repeat_interleave(G, 0), torch.randint(1, 64, (B * G, L), generator=g)], 1)
    cmask = (torch.arange(L)[None] < torch.tensor([L, 2, L, 1] * B)[:B * G, None]).long()
    seqs[:, P:] *= cmask
    attn = torch.cat([pmask.repeat_interleave(G, 0), cmask], 1)
    return engine.Samples(seqs, attn, cmask.float(), P, [""] * (B * G), cmask[:, -1].bool())


@pytest.mark.parametrize("arch", [{}, {"qk_norm": True, "qkv_bias": True}, {"gpt2": True, "o_bias": True, "mlp_bias": True}],
                         ids=["llama", "qwen3-like", "gpt2"])
def test_shared_rows_give_the_same_logps_entropy_and_gradients(arch):
    s, G = grouped(), 4
    m = s.mask.bool()
    weights = torch.randn(s.mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = []
    for group in (1, G):
        net = tiny(0, **arch).double()
        lp, ent = forward.completion_logps(net, s, DIST, chunk_size=7, temperature=0.7, entropy=True, group=group)
        (lp * s.mask * weights).sum().backward()
        out.append((lp, ent, {k: p.grad.clone() for k, p in net.named_parameters()}))
    (a, ea, ga), (b, eb, gb) = out
    assert torch.allclose(a[m], b[m], rtol=0, atol=1e-10) and torch.allclose(ea[m], eb[m], rtol=0, atol=1e-10)
    assert all((ga[k] - gb[k]).abs().max() <= 1e-6 * ga[k].abs().max() for k in ga)
    assert a[m].abs().min() > 0 and any(g.abs().sum() > 0 for g in ga.values())  # nothing vacuous


def test_generation_prefills_each_prompt_once_with_the_same_samples():
    s = grouped(B=3, G=4)
    ids, attn = s.seqs[:, :s.prompt_len], s.attn[:, :s.prompt_len]
    net = tiny(0).double().eval()
    runs = []
    for group in (1, 4):
        calls = []
        hook = net.model.embed_tokens.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
        with torch.no_grad():
            out = engine.generate_ids(net, ids, attn, engine.Sampling(6), generator=torch.Generator().manual_seed(3), group=group)
        hook.remove()
        runs.append((out, calls[0]))
    (a, prefill_rows), (b, shared_rows) = runs
    assert (prefill_rows, shared_rows) == (12, 3)  # the prefill ran on one row per prompt
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][0::4], a[0][1::4])  # the group's rows sampled different completions
    perm = torch.tensor([1, 0] + list(range(2, 12)))  # rows not in runs: the plain prefill
    with torch.no_grad():
        c = engine.generate_ids(net, ids[perm], attn[perm], engine.Sampling(6), generator=torch.Generator().manual_seed(3), group=4)
        d = engine.generate_ids(net, ids[perm], attn[perm], engine.Sampling(6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(c[0], d[0])


def test_layout_of_a_shared_row():
    s = grouped(B=1, G=2, P=3, L=2)
    r = forward.shared_prompt_rows(s.seqs, s.attn, 3, 2)
    assert r["input_ids"].tolist() == [s.seqs[0, :3].tolist() + s.seqs[0, 3:].tolist() + s.seqs[1, 3:].tolist()]
    assert r["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4]]  # both completions continue the prompt
    # the last prompt position predicts both first tokens; then each completion its own next token
    assert r["index"].tolist() == [[2, 3], [2, 5]]
    mask = r["attention_mask"][0, 0].int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0]  # the second completion's first token: the prompt and itself
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]


def test_rows_not_in_runs_of_one_prompt_are_not_shared():
    s = grouped()
    assert forward.shared_prompt_rows(s.seqs, s.attn, s.prompt_len, 4) is not None
    perm = torch.tensor([0, 4, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    assert forward.shared_prompt_rows(s.seqs[perm], s.attn[perm], s.prompt_len, 4) is None
    assert forward.shared_prompt_rows(s.seqs, s.attn, s.prompt_len, 3) is None  # 16 rows are not runs of 3
    net = tiny(0)
    with torch.no_grad():  # the fallback is the plain forward
        a = forward.completion_logps(net, s, DIST, 8, rows=perm, group=4)
        b = forward.completion_logps(net, s, DIST, 8, rows=perm)
    assert torch.equal(a, b)


@pytest.mark.parametrize("beta,grad_accum", [(0.0, 1), (0.1, 2)])
def test_one_grpo_step_is_the_same_with_and_without_sharing(beta, grad_accum):
    """The gradients the optimizer steps on are compared, not the weights after AdamW: its first step
    is lr * sign(g), which turns an fp32 rounding of a near-zero gradient into a whole lr."""
    s = grouped()
    scores = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1, 1])
    ref = tiny(1).requires_grad_(False) if beta else None
    results = []
    for share in (False, True):
        cfg = train_ppo.PPOConfig(minibatches=1, ppo_epochs=1, grad_accum=grad_accum, beta=beta, group_size=4,
                                  lr=1e-2, max_new_tokens=5, share_prompt=share)
        policy = tiny(0)
        opt = common.make_optimizer(policy, cfg)
        grads, step = {}, opt.step

        def recording_step(*args, **kwargs):
            grads.update({k: p.grad.clone() for k, p in policy.named_parameters()})
            return step(*args, **kwargs)
        opt.step = recording_step
        rl = train_ppo.RL(cfg, DIST, None, None, policy, opt, ref=ref)
        r = train_ppo.advantages(rl, s, scores, scores)
        stats, seen = train_ppo.update(rl, r, 0)  # one optimizer step: the update's forward gives the old log-probs
        results.append((seen["logps"], r.ref_logps, stats, grads))
    (a, ra, sa, ga), (b, rb, sb, gb) = results
    m = s.mask.bool()
    assert torch.allclose(a[m], b[m], atol=1e-6)
    assert (ra is None and rb is None) if not beta else torch.allclose(ra[m], rb[m], atol=1e-6)
    assert sa.keys() == sb.keys() and all(abs(sa[k] - sb[k]) < 1e-5 for k in sa)
    assert ga.keys() == {k for k, _ in tiny(0).named_parameters()}  # one optimizer step, every parameter
    assert all((ga[k] - gb[k]).abs().max() <= 1e-5 * ga[k].abs().max() for k in ga)
    assert sum(g.abs().sum() for g in ga.values()) > 0
