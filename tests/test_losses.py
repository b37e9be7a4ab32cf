"""Tests for losses.py: hand-computed values, invariants, and independent plain formulas.

Most checks run in float64 so tolerances can be tight (1e-10 relative); where fp32 is the point
(chunked log-probs), tolerances are set from fp32 rounding over the vocabulary sum.
"""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
f64 = torch.float64


def close(a, b, tol=1e-10):
    torch.testing.assert_close(torch.as_tensor(a, dtype=f64), torch.as_tensor(b, dtype=f64),
                               rtol=tol, atol=tol)


def logsig(x):  # math-module log(sigmoid(x)), independent of torch
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------ log-probs


def _full_logprobs(hidden, weight, labels):
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 64])  # 7 does not divide N = 2*9: ragged tail
def test_logprobs_from_hidden_value_and_grad_float64(chunk_size):
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 9, 6, 37
    hidden = torch.randn(B, T, D, generator=g, dtype=f64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=f64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g, dtype=f64)  # non-uniform grad_out

    out = losses.logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    ref = _full_logprobs(hidden, weight, labels)
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    assert out.shape == (B, T) and out.dtype == f64
    close(out, ref, 1e-12)
    close(gh, rh, 1e-12)
    close(gw, rw, 1e-12)


def test_logprobs_from_hidden_gradcheck():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, generator=g, dtype=f64, requires_grad=True)
    weight = torch.randn(11, 3, generator=g, dtype=f64, requires_grad=True)
    labels = torch.randint(0, 11, (5,), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w: losses.logprobs_from_hidden(h, w, labels, chunk_size=2), (hidden, weight))


def test_logprobs_from_hidden_fp32_matches_full():
    # fp32 logits over V=5000: logsumexp rounding is ~1e-6 relative; 1e-5 absolute is tight.
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(5000, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, 5000, (3, 40), generator=g)
    out = losses.logprobs_from_hidden(hidden, weight, labels, chunk_size=32)
    gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
    ref = _full_logprobs(hidden, weight, labels)
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_logprobs_from_hidden_bf16_tied_frozen_and_ignore_labels():
    g = torch.Generator().manual_seed(3)
    D, V = 8, 50
    emb = torch.randn(V, D, generator=g).bfloat16().requires_grad_()  # tied: embedding == lm head
    ids = torch.randint(0, V, (2, 6), generator=g)
    hidden = emb[ids] * 0.5
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100  # the last position has no next token
    out = losses.logprobs_from_hidden(hidden, emb, labels, chunk_size=4)
    assert out.dtype == torch.float32  # computed in fp32 even for bf16 inputs
    mask = labels != -100
    (out * mask).sum().backward()
    assert emb.grad.dtype == torch.bfloat16
    # reference: the same computation with a full fp32 log_softmax, tied weight in fp32
    emb32 = emb.detach().float().requires_grad_()
    h32 = emb32[ids] * 0.5
    h32 = h32.bfloat16().float()  # the chunked path saw bf16 hidden states
    ref = _full_logprobs(h32, emb32, labels.clamp(min=0))
    torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=1e-5)
    (ref * mask).sum().backward()
    torch.testing.assert_close(emb.grad.float(), emb32.grad, rtol=2e-2, atol=2e-2)  # bf16 grads

    # frozen head (e.g. LoRA): only hidden gets a gradient
    w = torch.randn(V, D, generator=g)
    h = torch.randn(4, D, generator=g, requires_grad=True)
    losses.logprobs_from_hidden(h, w, labels[0, :4], chunk_size=3).sum().backward()
    assert h.grad is not None and w.grad is None


def test_logprobs_and_entropy_from_hidden_stay_fp32_under_autocast():
    # Models call the head inside bf16 autocast; bf16 logits would be off by ~1e-2 here.
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(3000, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 3000, (2, 5), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.logprobs_from_hidden(hidden, weight, labels, chunk_size=4)
        ent = losses.entropy_from_hidden(hidden, weight, chunk_size=3)
        out.sum().backward()
    ref = _full_logprobs(hidden, weight, labels)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(hidden.grad, rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, rw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, losses.entropy_from_logits(hidden @ weight.T), rtol=0, atol=1e-5)
    assert not ent.requires_grad


def test_entropy_from_hidden_float64():
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(3, 7, 4, generator=g, dtype=f64)
    weight = torch.randn(13, 4, generator=g, dtype=f64)
    p = torch.softmax(hidden @ weight.T, -1)
    close(losses.entropy_from_hidden(hidden, weight, chunk_size=5), -(p * p.log()).sum(-1))


_MEM_SCRIPT = textwrap.dedent("""
    import re, sys, torch
    sys.path.insert(0, {root!r})
    import losses
    V, T, D, C, mode = {V}, {T}, {D}, {C}, {mode!r}
    torch.set_num_threads(2)
    def kb(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    def run(n):
        h, w, y = hidden[:n], weight, labels[:n]
        if mode == "chunked":
            out = losses.logprobs_from_hidden(h, w, y, chunk_size=C)
        else:
            out = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])
        return out
    torch.manual_seed(0)
    hidden = torch.randn(T, D, requires_grad=True)
    weight = (0.05 * torch.randn(V, D)).requires_grad_()
    labels = torch.randint(0, V, (T,))
    run(2).sum().backward()  # warm up kernels / thread pools outside the measurement
    weight.grad = hidden.grad = None
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (VmHWM)
    base = kb("VmRSS")
    out = run(T)
    fwd = kb("VmHWM") - base
    out.sum().backward()
    total = kb("VmHWM") - base
    print(fwd * 1024, total * 1024)
""")


def _peak_bytes(V, T, D, C, mode):
    src = _MEM_SCRIPT.format(root=ROOT, V=V, T=T, D=D, C=C, mode=mode)
    res = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    fwd, total = map(int, res.stdout.split())
    return fwd, total


@pytest.mark.slow  # a subprocess each, ~3 s
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_logprobs_from_hidden_peak_memory():
    """Qwen2.5's vocabulary (151,936) over 1,024 positions: the full fp32 logits alone would be
    622 MB; the chunked forward + backward must stay within a few [chunk, V] buffers."""
    V, T, D, C = 151_936, 1024, 64, 64
    full_logits = T * V * 4
    budget = 4 * C * V * 4 + 2 * V * D * 4 + 32 * 2**20  # 4 chunk buffers, W + grad W, slack
    assert budget < full_logits / 2  # so any version that materialises [T, V] logits fails
    fwd, total = _peak_bytes(V, T, D, C, "chunked")
    assert fwd < budget, f"forward peak {fwd / 2**20:.0f} MB > budget {budget / 2**20:.0f} MB"
    assert total < budget, f"fwd+bwd peak {total / 2**20:.0f} MB > budget {budget / 2**20:.0f} MB"


@pytest.mark.slow  # a subprocess each, ~3 s
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_peak_memory_harness_sees_naive_logits():
    # The measurement must catch a full-vocabulary implementation, or the test above proves nothing.
    V, T, D = 151_936, 256, 64
    fwd, total = _peak_bytes(V, T, D, 64, "naive")
    assert fwd >= T * V * 4 and total >= 2 * T * V * 4


def test_logprobs_from_logits_and_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=g, dtype=f64)
    labels = torch.tensor([[0, 6, -100], [3, 3, 1]])
    lp = losses.logprobs_from_logits(logits, labels)
    ref = -F.cross_entropy(logits.reshape(-1, 7), labels.clamp(min=0).reshape(-1), reduction="none")
    close(lp.double(), ref.view(2, 3), 1e-6)  # fp32 compute
    assert lp.dtype == torch.float32

    p = torch.softmax(logits, -1)
    close(losses.entropy_from_logits(logits), -(p * p.log()).sum(-1), 1e-6)
    close(losses.entropy_from_logits(torch.zeros(4, 10)), torch.full((4,), math.log(10)), 1e-6)
    # a near-one-hot distribution: p log p must not produce nan from log(0)
    spike = torch.tensor([[1000.0, 0.0, 0.0]])
    assert losses.entropy_from_logits(spike).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ SFT


def test_sft_loss_gradient_accumulation_normalisation():
    g = torch.Generator().manual_seed(5)
    logps = -torch.rand(8, 6, generator=g, dtype=f64)
    mask = torch.zeros(8, 6, dtype=f64)
    for i, n in enumerate([1, 6, 2, 5, 3, 6, 1, 4]):  # very uneven token counts per row
        mask[i, :n] = 1
    full = -(logps * mask).sum() / mask.sum()  # token mean over the whole optimizer step
    num_tokens = mask.sum()  # what the trainer all-reduces over micro-batches and ranks
    micro = [losses.sft_loss(logps[i:i + 2], mask[i:i + 2], num_tokens) for i in range(0, 8, 2)]
    close(sum(micro), full)
    close(losses.sft_loss(logps, mask, int(num_tokens.item())), full)
    mean_of_means = sum(-(logps[i:i + 2] * mask[i:i + 2]).sum() / mask[i:i + 2].sum()
                        for i in range(0, 8, 2)) / 4
    assert abs(mean_of_means - full) > 1e-3  # the buggy normalisation really differs here


# ------------------------------------------------------------------ DPO family


def _dpo(loss_type, m_or_logps, beta=0.1, ls=0.0, **kw):
    c, r, rc, rr = (torch.tensor(x, dtype=f64, requires_grad=True) for x in m_or_logps)
    out = losses.dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls, **kw)
    return out, c


def _pairs():
    # chosen, rejected, ref_chosen, ref_rejected per pair
    return [[-5.0, -9.0, 2.0, 0.0], [-7.0, -4.0, 1.0, -3.0], [-3.0, -6.0, 0.5, -8.0],
            [-2.0, -2.0, -4.0, -4.0]]


def test_dpo_sigmoid_hand_values_and_rewards():
    (l, cr, rr), c = _dpo("sigmoid", [[-1.0, -3.0], [-2.0, -2.0], [-1.5, -1.0], [-2.5, 0.0]])
    close(l, [math.log(2), math.log(2)])  # zero margin -> log 2
    close(cr, [0.1 * 0.5, 0.1 * -2.0])
    close(rr, [0.1 * 0.5, 0.1 * -2.0])
    assert not cr.requires_grad and not rr.requires_grad
    l.sum().backward()
    close(c.grad, [-0.1 / 2, -0.1 / 2])  # d/dm -logsigmoid(beta m) = -beta sigmoid(-beta m)
    # against the math module, for nonzero margins
    (l, _, _), _ = _dpo("sigmoid", list(zip(*_pairs())), beta=0.3)
    close(l, [-logsig(0.3 * ((a - b) - (ra - rb))) for a, b, ra, rb in _pairs()])


def test_cdpo_and_robust():
    x = list(zip(*_pairs()))
    base = _dpo("sigmoid", x, beta=0.5)[0][0]
    close(_dpo("sigmoid", x, beta=0.5, ls=0.0)[0][0], base)
    close(_dpo("robust", x, beta=0.5, ls=0.0)[0][0], base)
    e = 0.2
    ms = [0.5 * ((a - b) - (ra - rb)) for a, b, ra, rb in _pairs()]
    close(_dpo("sigmoid", x, beta=0.5, ls=e)[0][0],
          [-(1 - e) * logsig(m) - e * logsig(-m) for m in ms])
    # rDPO is unbiased: averaging over a label flipped with probability e recovers clean DPO
    flipped = [x[1], x[0], x[3], x[2]]
    rob = _dpo("robust", x, beta=0.5, ls=e)[0][0]
    rob_flip = _dpo("robust", flipped, beta=0.5, ls=e)[0][0]
    close((1 - e) * rob + e * rob_flip, base)
    # cDPO is minimised where sigmoid(beta m) = 1 - e
    m_star = math.log((1 - e) / e) / 0.5
    (l, _, _), c = _dpo("sigmoid", [[m_star], [0.0], [0.0], [0.0]], beta=0.5, ls=e)
    l.sum().backward()
    close(c.grad, [0.0])


def test_ipo_minimum_and_value():
    beta = 0.25
    (l, _, _), c = _dpo("ipo", [[1 / (2 * beta) - 1.0], [-1.0], [0.0], [0.0]], beta=beta)
    close(l, [0.0])
    l.sum().backward()
    close(c.grad, [0.0])  # gradient zero at the target margin 1/(2 beta)
    (l, _, _), _ = _dpo("ipo", [[0.0], [0.0], [0.0], [0.0]], beta=beta)
    close(l, [4.0])  # (0 - 2)^2


def test_hinge():
    (l, _, _), c = _dpo("hinge", [[12.0, 10.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                                  [0.0, 0.0, 0.0]], beta=0.1)
    close(l, [0.0, 0.0, 0.7])  # zero once beta m >= 1
    l.sum().backward()
    close(c.grad, [0.0, 0.0, -0.1])


def test_pairwise_variants_against_math():
    beta = 0.4
    x = list(zip(*_pairs()))
    cases = {
        "nca_pair": lambda w, l: -logsig(beta * w) - 0.5 * logsig(-beta * w) - 0.5 * logsig(-beta * l),
        "bco_pair": lambda w, l: -logsig(beta * w - 0.3) - logsig(-(beta * l - 0.3)),
        "sppo_hard": lambda w, l: (w - 0.5 / beta) ** 2 + (l + 0.5 / beta) ** 2,
        "apo_zero": lambda w, l: (1 - sig(beta * w)) + sig(beta * l),
        "apo_down": lambda w, l: sig(beta * w) + (1 - sig(beta * (w - l))),
    }
    for loss_type, fn in cases.items():
        (l, cr, rr), _ = _dpo(loss_type, x, beta=beta, delta=0.3)
        close(l, [fn(a - ra, b - rb) for a, b, ra, rb in _pairs()])
        close(cr, [beta * (a - ra) for a, _, ra, _ in _pairs()])
    # hand values at zero log-ratios
    zeros = [[0.0]] * 4
    close(_dpo("apo_zero", zeros)[0][0], [1.0])
    close(_dpo("apo_down", zeros)[0][0], [1.0])
    close(_dpo("bco_pair", zeros)[0][0], [2 * math.log(2)])
    close(_dpo("nca_pair", zeros)[0][0], [2 * math.log(2)])
    # SPPO-hard is zero exactly at r_w = 1/(2 beta), r_l = -1/(2 beta)
    close(_dpo("sppo_hard", [[1.25], [-1.25], [0.0], [0.0]], beta=beta)[0][0], [0.0])


def test_exo_pair_is_bernoulli_kl():
    beta, e = 0.5, 0.1

    def kl(m, eps):
        p = sig(beta * m)
        return p * math.log(p / (1 - eps)) + (1 - p) * math.log((1 - p) / eps)

    ms = [(a - b) - (ra - rb) for a, b, ra, rb in _pairs()]
    close(_dpo("exo_pair", list(zip(*_pairs())), beta=beta, ls=e)[0][0], [kl(m, e) for m in ms])
    close(_dpo("exo_pair", list(zip(*_pairs())), beta=beta)[0][0], [kl(m, 1e-3) for m in ms])
    m_star = math.log((1 - e) / e) / beta  # model preference equals the target: KL = 0
    close(_dpo("exo_pair", [[m_star], [0.0], [0.0], [0.0]], beta=beta, ls=e)[0][0], [0.0])


def test_sigmoid_norm_aot_discopop_against_math():
    beta = 0.4
    x = list(zip(*_pairs()))
    ms = [(a - b) - (ra - rb) for a, b, ra, rb in _pairs()]
    # sigmoid_norm: DPO's formula, the caller passing average log-probs
    close(_dpo("sigmoid_norm", x, beta=beta)[0][0], [-logsig(beta * m) for m in ms])
    # aot: policy log-odds c - r = [4, -3, 3, 0] and reference ones [2, 4, 8.5, 0], each sorted
    # over the batch: [-3, 0, 3, 4] - [0, 2, 4, 8.5] = [-3, -2, -1, -4.5]
    e = 0.1
    d = [-3.0, -2.0, -1.0, -4.5]
    close(_dpo("aot", x, beta=beta, ls=e)[0][0], [-(1 - e) * logsig(beta * v) - e * logsig(-beta * v) for v in d])
    # aot_pair: chosen log-ratios [-7, -8, -3.5, 2] and rejected [-9, -1, 2, 2], each sorted:
    # [-8, -7, -3.5, 2] - [-9, -1, 2, 2] = [1, -6, -5.5, 0]
    d = [1.0, -6.0, -5.5, 0.0]
    close(_dpo("aot_pair", x, beta=beta)[0][0], [-logsig(beta * v) for v in d])
    # sorting is per batch: with one pair both AOT types are cDPO / DPO on that pair
    one = [[v] for v in _pairs()[1]]
    close(_dpo("aot", one, beta=beta, ls=e)[0][0], _dpo("sigmoid", one, beta=beta, ls=e)[0][0])
    close(_dpo("aot_pair", one, beta=beta)[0][0], _dpo("sigmoid", one, beta=beta)[0][0])
    # discopop (DiscoPOP eq. 5): a sigmoid(beta m / tau) blend of the logistic and exponential losses
    for tau in (0.05, 2.0):
        s = [sig(beta * m / tau) for m in ms]
        close(_dpo("discopop", x, beta=beta, discopop_tau=tau)[0][0],
              [(1 - si) * -logsig(beta * m) + si * math.exp(-beta * m) for si, m in zip(s, ms)])
    # at zero margin both halves weigh 1/2: (log 2 + 1) / 2
    close(_dpo("discopop", [[0.0]] * 4)[0][0], [(math.log(2) + 1) / 2])


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError):
        _dpo("nope", [[0.0]] * 4)


def test_simpo():
    c = torch.tensor([-1.0, -0.5], dtype=f64, requires_grad=True)
    r = torch.tensor([-1.5, -2.0], dtype=f64)
    l, cr, rr = losses.simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5)
    close(l, [math.log(2), -logsig(2.0 * (1.5 - 0.5))])  # margin equal to gamma/beta -> log 2
    close(cr, [-2.0, -1.0])
    close(rr, [-3.0, -4.0])
    l[0].backward()
    close(c.grad, [-1.0, 0.0])  # -beta * sigmoid(0)


def test_orpo():
    c = torch.tensor([-0.2, -1e-9, -3.0], dtype=f64, requires_grad=True)
    r = torch.tensor([-0.9, -0.7, -0.1], dtype=f64)
    l, cr, rr, log_odds = losses.orpo_loss(c, r, beta=0.1)

    def lodds(lp):
        p = math.exp(lp)
        return math.log(p / (1 - p))

    expected = [lodds(a) - lodds(b) for a, b in zip(c.tolist(), r.tolist())]
    close(log_odds, expected, 1e-8)  # -1e-9: p = 1 - 1e-9, where log1p(-exp) is ill-conditioned
    close(l, [-0.1 * logsig(x) for x in expected], 1e-8)
    close(cr, 0.1 * c.detach())
    assert torch.isfinite(torch.autograd.grad(l.sum(), c)[0]).all()
    # equal probabilities -> zero log odds -> beta * log 2
    close(losses.orpo_loss(r, r, beta=0.1)[0], [0.1 * math.log(2)] * 3)


def test_kto():
    policy = torch.tensor([-3.0, -4.0, -2.0, -6.0], dtype=f64, requires_grad=True)
    ref = torch.tensor([-4.0, -3.0, -2.5, -5.0], dtype=f64)
    desirable = torch.tensor([True, True, False, False])
    kl = torch.tensor(0.2, dtype=f64, requires_grad=True)
    beta, wd, wu = 0.5, 1.0, 1.5
    l, rewards = losses.kto_loss(policy, ref, desirable, kl, beta=beta, desirable_weight=wd,
                                 undesirable_weight=wu)
    lr = [1.0, -1.0, 0.5, -1.0]
    close(l, [wd * (1 - sig(beta * (lr[0] - 0.2))), wd * (1 - sig(beta * (lr[1] - 0.2))),
              wu * (1 - sig(beta * (0.2 - lr[2]))), wu * (1 - sig(beta * (0.2 - lr[3])))])
    close(rewards, [beta * x for x in lr])
    l.sum().backward()
    assert kl.grad is None  # the reference point is a baseline, not optimised
    # a negative KL estimate is clamped to zero
    l_neg, _ = losses.kto_loss(policy, ref, desirable, torch.tensor(-1.0, dtype=f64), beta=beta)
    l_zero, _ = losses.kto_loss(policy, ref, desirable, torch.tensor(0.0, dtype=f64), beta=beta)
    close(l_neg, l_zero)


def test_reward_loss():
    c = torch.tensor([2.0, 0.0, 1.0], dtype=f64)
    r = torch.tensor([1.0, 0.0, 3.0], dtype=f64)
    loss, acc = losses.reward_loss(c, r)
    close(loss, (-logsig(1.0) + math.log(2) - logsig(-2.0)) / 3)
    close(acc, 1 / 3)  # ties do not count as correct
    loss_m, _ = losses.reward_loss(c, r, margin=torch.tensor([1.0, 0.0, 0.0], dtype=f64))
    close(loss_m, (math.log(2) + math.log(2) - logsig(-2.0)) / 3)
    loss_c, _ = losses.reward_loss(c, r, center_coef=0.01)
    close(loss_c - loss, 0.01 * (9 + 0 + 16) / 3)


# ------------------------------------------------------------------ RL pieces


def test_kl_penalty_values_and_unbiasedness():
    lp = torch.tensor([[-1.0, -2.0]], dtype=f64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=f64)
    close(losses.kl_penalty(lp, ref, "k1"), [[0.5, -1.0]])
    close(losses.kl_penalty(lp, ref, "k2"), [[0.125, 0.5]])
    close(losses.kl_penalty(lp, ref, "k3"), [[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1]])
    # exact expectation under the policy over a small vocabulary: k1 and k3 are unbiased for
    # KL(pi || ref); k3 is also nonnegative per sample.
    g = torch.Generator().manual_seed(6)
    logp = torch.log_softmax(torch.randn(20, generator=g, dtype=f64), 0)
    logref = torch.log_softmax(torch.randn(20, generator=g, dtype=f64), 0)
    true_kl = (logp.exp() * (logp - logref)).sum()
    for kind in ("k1", "k3"):
        close((logp.exp() * losses.kl_penalty(logp, logref, kind)).sum(), true_kl)
    assert (losses.kl_penalty(logp, logref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        losses.kl_penalty(lp, ref, "k4")


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]], dtype=f64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    close(losses.masked_mean(x, mask), 15 / 5)
    close(losses.masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(losses.masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not nan

    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (vals - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8)
    w = losses.masked_whiten(x, mask)
    close(w[mask], expected)
    close(w[~mask], [0.0])
    w2 = losses.masked_whiten(x, mask.double(), shift_mean=False)
    close(w2[mask], expected + vals.mean())


def _gae_loop(rewards, values, lengths, gamma, lam):
    adv = [[0.0] * len(r) for r in rewards]
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            nv = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * nv - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    return adv


def test_gae_against_python_loop():
    g = torch.Generator().manual_seed(7)
    B, T = 3, 6
    lengths = [6, 3, 1]
    mask = torch.zeros(B, T, dtype=f64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    rewards = torch.randn(B, T, generator=g, dtype=f64)
    values = torch.randn(B, T, generator=g, dtype=f64)  # garbage in the padding must not leak
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
        exp = torch.tensor(_gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam), dtype=f64)
        close(adv, exp)
        close(ret, (exp + values) * mask)
    # gamma = lam = 1: return is the plain sum of future rewards (Monte Carlo)
    _, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret[1, 0], rewards[1, :3].sum())


def test_discounted_returns_and_global_whitening():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]], dtype=f64)  # 9s are padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=f64)
    close(losses.discounted_returns(rewards, mask), [[6.0, 5.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    close(losses.discounted_returns(rewards, mask, gamma=0.5), [[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0, 0.0],
                                                                 [4.0, 0.0, 0.0, 0.0]])
    # two "ranks" whitened with the moments of both together equal one whitening of the whole batch
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=f64)
    m = (torch.rand(4, 5, generator=torch.Generator().manual_seed(4)) > 0.3).double()
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / (n - 1)
    parts = [losses.masked_whiten(x[i:i + 2], m[i:i + 2], mean=mean, var=var) for i in (0, 2)]
    close(torch.cat(parts), losses.masked_whiten(x, m))


def test_group_and_rloo_advantages():
    g = torch.Generator().manual_seed(8)
    rewards = torch.rand(12, generator=g, dtype=f64)
    r = rewards.numpy().reshape(3, 4)
    exp = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    close(losses.group_advantages(rewards, 4), exp.reshape(-1))
    close(losses.group_advantages(rewards, 4, scale=False), (r - r.mean(1, keepdims=True)).reshape(-1))
    # all-equal rewards in a group: zero advantage, not nan
    close(losses.group_advantages(torch.ones(4, dtype=f64), 4), [0.0] * 4)
    loo = [r[i, j] - (r[i].sum() - r[i, j]) / 3 for i in range(3) for j in range(4)]
    close(losses.rloo_advantages(rewards, 4), loo)
    close(losses.rloo_advantages(torch.tensor([1.0, 0.0], dtype=f64), 2), [1.0, -1.0])


def test_policy_gradient_loss_aggregations():
    x = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 1.0]], dtype=f64)  # 9s are padding
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=f64)
    close(losses.policy_gradient_loss(x, mask, "grpo"), (2 + 1) / 2)
    close(losses.policy_gradient_loss(x, mask, "dapo"), 5 / 4)
    close(losses.policy_gradient_loss(x, mask, "dr_grpo"), 5 / 6)
    close(losses.policy_gradient_loss(x, mask, "dr_grpo", max_len=10), 5 / 20)
    # dapo over two ranks, as train_ppo.py calls it: rank 0 holds row 0 (1 token), rank 1 row 1
    # (3 tokens); each divides by 4 tokens / 2 ranks, and averaging the ranks gives the global mean
    # 5 / 4 where averaging per-rank means would give (2 + 1) / 2
    per_rank = [losses.policy_gradient_loss(x[i:i + 1], mask[i:i + 1], "dapo", num_tokens=4 / 2) for i in range(2)]
    close(sum(per_rank) / 2, 5 / 4)
    with pytest.raises(ValueError):
        losses.policy_gradient_loss(x, mask, "mean")


def test_ppo_policy_loss():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=f64)
    adv = torch.tensor([[1.0, -2.0, 0.5, 7.0]], dtype=f64)
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=f64)
    # ratio 1 everywhere: loss = -mean(A) over the mask, nothing clipped, KL 0
    lp = old.clone().requires_grad_()
    loss, stats = losses.ppo_policy_loss(lp, old, adv, mask)
    close(loss, -(1.0 - 2.0 + 0.5) / 3)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)
    loss.backward()
    close(lp.grad, -adv * mask / 3)  # d/dlogp (-A ratio) = -A ratio

    # ratios 1.5, 1.5, 0.5: token 0 (A>0, ratio>1.2) and token 1 (A<0, ratio... 1.5>1: unclipped
    # term is larger, so not clipped), token 2 (A>0, ratio<0.8: unclipped term larger, not clipped)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 1.0]], dtype=f64)
    lp = (old + ratios.log()).requires_grad_()
    loss, stats = losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    close(loss, (-(1.0 * 1.2) + 2.0 * 1.5 - 0.5 * 0.5) / 3)
    close(stats["clipfrac"], 1 / 3)
    lr = [math.log(1.5), math.log(1.5), math.log(0.5)]
    close(stats["approx_kl"], sum(math.exp(v) - 1 - v for v in lr) / 3)
    loss.backward()
    close(lp.grad, [[0.0, 2.0 * 1.5 / 3, -0.5 * 0.5 / 3, 0.0]])  # clipped token has no gradient
    # DAPO clip-higher: with clip_eps_high = 0.6, ratio 1.5 is inside the trust region
    loss, stats = losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    close(loss, (-1.0 * 1.5 + 2.0 * 1.5 - 0.5 * 0.5) / 3)
    close(stats["clipfrac"], 0.0)
    # the agg argument delegates to policy_gradient_loss
    per_tok = torch.tensor([[-1.5, 3.0, -0.25, 0.0]], dtype=f64)
    loss, _ = losses.ppo_policy_loss(lp, old, adv, mask, clip_eps_high=0.6, agg="dr_grpo")
    close(loss, losses.policy_gradient_loss(per_tok, mask, "dr_grpo"))


def test_ppo_value_loss():
    values = torch.tensor([[1.0, 0.5, 2.0]], dtype=f64, requires_grad=True)
    old = torch.tensor([[0.0, 0.4, 0.0]], dtype=f64)
    returns = torch.tensor([[2.0, 0.0, 5.0]], dtype=f64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=f64)
    loss, stats = losses.ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24 (clip active)
    # token 1: unclipped 0.25, clipped (0.5-0)^2 = 0.25 (inside the clip range) -> 0.25
    close(loss, 0.5 * (3.24 + 0.25) / 2)
    close(stats["vf_clipfrac"], 0.5)
    loss.backward()
    close(values.grad, [[0.0, 0.5 * 2 * 0.5 / 2, 0.0]])  # clipped token carries no gradient


def test_gspo_sequence_level_ratio():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=f64)
    old = torch.full((2, 4), -1.0, dtype=f64)
    delta = torch.tensor([[0.3, -0.1, 0.1, 5.0], [0.02, -0.04, 9.0, 9.0]], dtype=f64)  # padding: huge
    adv = torch.tensor([[2.0], [-1.0]], dtype=f64) * torch.ones(2, 4, dtype=f64)
    lp = (old + delta).requires_grad_()
    # sequence ratios s = exp(mean log-ratio over the mask): exp(0.1) (A > 0, beyond 1 + 0.05:
    # clipped) and exp(-0.01) (inside [0.95, 1.05]); the padding never enters
    s0, s1 = math.exp(0.1), math.exp(-0.01)
    loss, st = losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.05, agg="grpo", level="sequence")
    close(loss, (-2.0 * 1.05 + 1.0 * s1) / 2)
    close(st["clipfrac"], 3 / 5)
    loss.backward()
    # the clipped sequence has no gradient; every token of the other gets the same one:
    # d/dlogp_t (A s / 2) = A s / (2 |y|), since ds/dlogp_t = s / |y|
    close(lp.grad, [[0.0] * 4, [s1 / 4, s1 / 4, 0.0, 0.0]])
    # token mean: a sequence's tokens still share one gradient, -A s / N (N = 5 tokens)
    lp.grad = None
    losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, level="sequence")[0].backward()
    close(lp.grad, [[-2.0 * s0 / 5] * 3 + [0.0], [s1 / 5] * 2 + [0.0, 0.0]])
    # a sequence of one token is token-level PPO
    one = [t[:1, :1] for t in (lp.detach(), old, adv, mask)]
    close(losses.ppo_policy_loss(*one, level="sequence")[0], losses.ppo_policy_loss(*one)[0])
    with pytest.raises(ValueError):
        losses.ppo_policy_loss(lp, old, adv, mask, level="sentence")


def test_cispo_loss():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=f64)
    adv = torch.tensor([[1.0, -2.0, 0.5, 7.0]], dtype=f64)
    old = torch.full((1, 4), -1.0, dtype=f64)
    ratios = torch.tensor([[1.5, 8.0, 0.5, 1.0]], dtype=f64)
    lp = (old + ratios.log()).requires_grad_()
    loss, st = losses.cispo_loss(lp, old, adv, mask, max_ratio=5.0)
    # weights min(ratio, 5) = 1.5, 5, 0.5, times -A * logp; token mean over 3 tokens
    lpv = lp.detach()[0].tolist()
    close(loss, -(1.5 * 1.0 * lpv[0] + 5.0 * -2.0 * lpv[1] + 0.5 * 0.5 * lpv[2]) / 3)
    close(st["clipfrac"], 1 / 3)
    loss.backward()
    # the weight is a constant: the gradient is -w * A / N, also for the capped token (PPO's clip
    # would give it none), with no d(ratio)/d(logp) term
    close(lp.grad, [[-1.5 / 3, 10.0 / 3, -0.25 / 3, 0.0]])
    # on-policy (ratio 1), CISPO's gradient is the policy gradient, the same as PPO's
    lp1 = old.clone().requires_grad_()
    losses.cispo_loss(lp1, old, adv, mask)[0].backward()
    lp2 = old.clone().requires_grad_()
    losses.ppo_policy_loss(lp2, old, adv, mask)[0].backward()
    close(lp1.grad, lp2.grad)


def test_sapo_loss():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=f64)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]], dtype=f64)
    old = torch.full((2, 3), -1.0, dtype=f64)
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.2, 1.0, 1.0]], dtype=f64)
    lp = (old + ratios.log()).requires_grad_()
    tp, tn = 1.0, 1.05
    loss, st = losses.sapo_loss(lp, old, adv, mask, tau_pos=tp, tau_neg=tn)

    def gate(r, tau):
        return sig(tau * (r - 1)) * 4 / tau

    seq0 = -sum(gate(r, tp) for r in (1.0, 1.5, 0.5)) / 3
    seq1 = 2.0 * gate(1.2, tn)
    close(loss, (seq0 + seq1) / 2)  # agg="grpo": per-sequence means, then the mean
    loss.backward()

    def dgate(r, tau):  # d gate / d logp = 4 sigmoid'(tau (r - 1)) * r
        return 4 * sig(tau * (r - 1)) * (1 - sig(tau * (r - 1))) * r

    close(lp.grad, [[-dgate(r, tp) / 6 for r in (1.0, 1.5, 0.5)], [2.0 * dgate(1.2, tn) / 2, 0.0, 0.0]])
    close(lp.grad[0, 0], -1 / 6)  # at ratio 1 the gradient is exactly the policy gradient's
    close(st["ratio_mean"], (1.0 + 1.5 + 0.5 + 1.2) / 4)


# ------------------------------------------------------------------ distillation


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_generalized_jsd_against_math():
    s_logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=f64)
    t_logits = torch.tensor([[0.0, 1.0, 0.5], [0.5, 2.0, 0.0]], dtype=f64)  # row 1: the same distribution
    for temp in (1.0, 2.0):
        S = [[math.exp(v / temp) / sum(math.exp(u / temp) for u in row) for v in row] for row in s_logits.tolist()]
        T = [[math.exp(v / temp) / sum(math.exp(u / temp) for u in row) for v in row] for row in t_logits.tolist()]
        close(losses.generalized_jsd(s_logits, t_logits, 0.0, temp), [_kl(T[0], S[0]), 0.0])
        close(losses.generalized_jsd(s_logits, t_logits, 1.0, temp), [_kl(S[0], T[0]), 0.0])
        for beta in (0.5, 0.2):
            M = [(1 - beta) * a + beta * b for a, b in zip(S[0], T[0])]
            close(losses.generalized_jsd(s_logits, t_logits, beta, temp),
                  [beta * _kl(T[0], M) + (1 - beta) * _kl(S[0], M), 0.0])
    # the generalized JSD is symmetric under swapping the models and beta <-> 1 - beta; the JSD
    # (beta = 1/2) is bounded by log 2
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g, dtype=f64) * 3, torch.randn(5, 7, generator=g, dtype=f64) * 3
    close(losses.generalized_jsd(a, b, 0.3), losses.generalized_jsd(b, a, 0.7))
    assert (losses.generalized_jsd(a, b, 0.5) <= math.log(2)).all()
    assert (losses.generalized_jsd(a, b, 0.5) > 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_from_hidden_chunked_equals_full(beta):
    g = torch.Generator().manual_seed(1)
    N, V = 11, 13
    hs = torch.randn(N, 4, generator=g, dtype=f64, requires_grad=True)
    ws = torch.randn(V, 4, generator=g, dtype=f64, requires_grad=True)
    ht, wt = torch.randn(N, 6, generator=g, dtype=f64), torch.randn(V, 6, generator=g, dtype=f64)  # a wider teacher
    weights = torch.randn(N, generator=g, dtype=f64)  # a different weight per position
    full = losses.generalized_jsd(hs @ ws.T, ht @ wt.T, beta, 1.5)
    grads = torch.autograd.grad((full * weights).sum(), (hs, ws))
    for chunk in (1, 4, 64):  # 4 does not divide 11: a ragged last chunk
        out = losses.generalized_jsd_from_hidden(hs, ws, ht, wt, beta, 1.5, chunk_size=chunk)
        close(out, full)
        for got, want in zip(torch.autograd.grad((out * weights).sum(), (hs, ws)), grads):
            close(got, want)
