"""
Every post-training objective in nanotrl, as a small pure function of tensors.

No models, no config objects, no distributed code: each function takes log-probs, scores or
rewards and returns a loss (plus detached metrics where useful). Open the function for your
algorithm, read the paper's equation, change it, rerun.

Conventions (everywhere in nanotrl):
  - `labels[b, t]` is the token that position `t` predicts. The shift is done once, where batches
    are built (data/batching.py: labels = input_ids shifted left by one; train_ppo.py for rollouts).
  - Masks are `[B, T]`, bool or float 0/1; 1 marks a token that counts (usually completion tokens).
  - Sequence log-probs (`chosen_logps` etc.) are sums over the completion tokens, unless a function
    says it wants averages (IPO, SimPO, ORPO).
  - Metrics returned beside a loss are detached; losses are not.
"""
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

# ---------------------------------------------------------------------------------------------
# Token log-probs
# ---------------------------------------------------------------------------------------------


def _head_weight(weight, dtype):
    """The LM head as the chunked log-probs multiply it: a bf16/fp16 head on a GPU as it is (with
    fp32 output, _head_mm), not as an fp32 copy ([V, D]: 2.1 GB for Llama-3-8B per call); else in
    `dtype` (fp32, or fp64 in exact tests)."""
    return weight if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) else weight.to(dtype)


def _head_mm(h, w, out):
    """out [C, V] = h @ w.T in out's dtype: bf16 inputs accumulate in fp32 on the tensor cores."""
    if w.dtype != out.dtype:
        return torch.mm(h.to(w.dtype), w.T, out_dtype=out.dtype, out=out)
    return torch.mm(h.to(out.dtype), w.T, out=out)


def _no_autocast(t):
    # The model may call the head under bf16 autocast, which would silently run our fp32 matmuls
    # in bf16: log-probs of a 150k vocabulary need fp32 logits.
    return torch.autocast(t.device.type, enabled=False)


class _ChunkedLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[labels], never materialising more than [chunk, V] logits.

    The forward keeps only the per-position logsumexp [N]; the backward recomputes each chunk's
    logits and uses d logp_i / d logits_i = onehot(label_i) - softmax(logits_i).
    One [chunk, V] buffer is allocated per pass and every chunk is computed into it in place: a
    fresh allocation per chunk pays its page faults again each time (a third of the step on a
    CPU), and torch.logsumexp would allocate a second buffer.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):  # [N, D], [V, D], [B, T] long -> [B, T]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for exact tests
        w = _head_weight(weight, dtype)
        N, shape, labels = labels.numel(), labels.shape, labels.reshape(-1)
        # the output in the labels' shape, not a view of a flat one: FSDP2 warns about a module
        # returning a view (an in-place op on it would skip its backward hook)
        out = hidden.new_empty(shape, dtype=dtype)
        logps, lse = out.view(-1), hidden.new_empty(N, dtype=dtype)
        buf = hidden.new_empty(min(chunk_size, N), w.shape[0], dtype=dtype)
        with _no_autocast(hidden):
            for s in range(0, N, chunk_size):
                e = min(s + chunk_size, N)
                logits = _head_mm(hidden[s:e], w, buf[:e - s])  # [C, V]
                picked = logits.gather(1, labels[s:e, None]).squeeze(1)
                m = logits.amax(dim=-1, keepdim=True)
                lse[s:e] = logits.sub_(m).exp_().sum(dim=-1).log_() + m.squeeze(1)
                logps[s:e] = picked - lse[s:e]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_logps = grad_logps.reshape(-1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, N, C = lse.dtype, labels.numel(), ctx.chunk_size
        w = _head_weight(weight, dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = w.new_zeros(w.shape, dtype=dtype) if need_w else None  # accumulated over chunks in fp32
        buf = hidden.new_empty(min(C, N), w.shape[0], dtype=dtype)
        with _no_autocast(hidden):
            for s in range(0, N, C):
                e = min(s + C, N)
                h, g = hidden[s:e].to(dtype), grad_logps[s:e].to(dtype)
                # dlogits = g * (onehot - softmax), built in place in the [C, V] buffer
                dlogits = _head_mm(h, w, buf[:e - s]).sub_(lse[s:e, None]).exp_().mul_(-g[:, None])
                dlogits.scatter_add_(1, labels[s:e, None], g[:, None])
                if need_h:
                    grad_h[s:e] = dlogits @ w if w.dtype == dtype else torch.mm(dlogits.to(w.dtype), w, out_dtype=dtype)
                if need_w:
                    grad_w.addmm_(dlogits.T, h)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def logprobs_from_hidden(hidden, lm_head_weight, labels, chunk_size=256):
    """Per-token log-probs of `labels` straight from the last hidden states, chunked over positions.

    hidden [B, T, D] (or [N, D]), lm_head_weight [V, D], labels [B, T] (or [N]) -> logps [B, T] fp32.

    Equal to `log_softmax(hidden @ W.T, -1).gather(-1, labels)`, but the [T, V] logits never
    exist: each chunk of `chunk_size` positions is projected in fp32, reduced to its logsumexp, and
    recomputed in the backward pass. Peak extra memory is O(chunk_size * V) forward and backward
    instead of O(B * T * V) (151,936 x 2,048 fp32 logits alone are 1.2 GB, and autograd keeps
    several such tensors). Gradients flow to `hidden` and `lm_head_weight` (tied or not) in their
    own dtypes. Same idea as Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024), in torch.

    Labels that are negative (-100) are clamped to 0 so gather never fails: the value returned at
    those positions is meaningless and masking it out is the caller's job.
    """
    labels = labels.clamp(min=0).long()
    return _ChunkedLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, labels, chunk_size)


def logprobs_from_logits(logits, labels):
    """Per-token log-probs of `labels` from full logits, in fp32. For small vocabularies.

    logits [B, T, V], labels [B, T] -> logps [B, T]. Negative labels are clamped to 0 (mask them).
    """
    logits = logits.float()
    labels = labels.clamp(min=0).long()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def entropy_from_hidden(hidden, lm_head_weight, chunk_size=256):
    """Per-token entropy of the policy from the last hidden states, chunked like the log-probs.

    hidden [B, T, D] (or [N, D]), lm_head_weight [V, D] -> entropy [B, T] fp32. A metric, so no
    gradient: peak memory is O(chunk_size * V).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    w = _head_weight(lm_head_weight, dtype)
    with _no_autocast(hidden):
        chunks = [entropy_from_logits(_head_mm(flat[s:s + chunk_size], w, flat.new_empty(
                  min(chunk_size, flat.shape[0] - s), w.shape[0], dtype=dtype)))
                  for s in range(0, flat.shape[0], chunk_size)]
    return torch.cat(chunks).reshape(hidden.shape[:-1]).clone()  # not a view: see _ChunkedLogprobs


def generalized_jsd_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, beta=0.5,
                                temperature=1.0, chunk_size=256):
    """`generalized_jsd` of two models at the same positions, from their last hidden states,
    a chunk of positions at a time.

    student_hidden [N, Ds], student_weight [V, Ds], teacher_hidden [N, Dt], teacher_weight [V, Dt]
    -> per-position divergence [N] fp32. The models may differ in width; they share the vocabulary.

    Each chunk runs under activation checkpointing: its [chunk, V] logits of both models (and
    their softmaxes) are freed after the forward and recomputed, one chunk at a time, in the
    backward. Peak extra memory is O(chunk_size * V) instead of the O(N * V) per model that
    autograd would otherwise keep alive. Gradients flow to the student's hidden states and
    weight only (pass the teacher's detached).
    """
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)

    def chunk(hs, ws, ht, wt):
        with _no_autocast(hs):
            return generalized_jsd(hs.to(dtype) @ ws.to(dtype).T, ht.to(dtype) @ wt.to(dtype).T, beta, temperature)

    out = [torch.utils.checkpoint.checkpoint(chunk, student_hidden[s:s + chunk_size], student_weight,
                                             teacher_hidden[s:s + chunk_size], teacher_weight, use_reentrant=False)
           for s in range(0, student_hidden.shape[0], chunk_size)]
    return torch.cat(out) if out else student_hidden.new_zeros(0, dtype=dtype)


def entropy_from_logits(logits):
    """Entropy of softmax(logits) in nats, in fp32: logits [..., V] -> [...].

    H = logsumexp(l) - sum_v softmax(l)_v * l_v, which avoids log(0) for tiny probabilities.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning
# ---------------------------------------------------------------------------------------------


def sft_loss(logps, mask, num_tokens):
    """Masked token negative log-likelihood, normalised by the whole optimizer step's token count.

    logps [B, T], mask [B, T], num_tokens (int or 0-d tensor) -> scalar.

    loss = -sum(logps * mask) / num_tokens, where `num_tokens` is the number of loss tokens in the
    whole optimizer step: summed over all gradient-accumulation micro-batches and all ranks (the
    caller all-reduces it before the step). Summing this loss over micro-batches (and over ranks,
    which gradient all-reduce does) then gives exactly the token mean of the full batch. Averaging
    per-micro-batch token means instead over-weights tokens of micro-batches with few tokens, a
    known gradient-accumulation bug (Hugging Face "Fixing Gradient Accumulation", Oct 2024).
    """
    return -(logps * mask).sum() / num_tokens


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """The generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, "On-Policy
    Distillation of Language Models", eq. 1), per position, summed over the vocabulary.

    student_logits, teacher_logits [..., V] -> [...] fp32 (no reduction over positions).

    With S = softmax(student / temperature), T = softmax(teacher / temperature) and the mixture
    M = (1 - beta) S + beta T:
      beta = 0      KL(T || S)   forward KL, supervised KD (Hinton et al., 2015)
      beta = 1      KL(S || T)   reverse KL, mode seeking (MiniLLM, Gu et al., 2024)
      otherwise     beta * KL(T || M) + (1 - beta) * KL(S || M)
    (beta -> 0 in the general formula tends to 0, not to KL(T || S): the ends are defined
    separately, as TRL's GKDTrainer does.) log M is a logsumexp of the two
    log-probs, so nothing is computed outside log space.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Preference optimisation (offline)
# ---------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "exo_pair", "sigmoid_norm", "aot", "aot_pair", "discopop")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, delta=0.0, discopop_tau=0.05):
    """The DPO family of pairwise losses, with TRL's formulas (`DPOTrainer.dpo_loss`).

    All inputs [B] (sequence log-probs of the policy and the frozen reference; pass zeros for the
    reference to train reference-free) -> (losses [B], chosen_rewards [B], rejected_rewards [B]),
    where the implicit rewards beta * (policy - reference) are detached.

    With r_w = chosen - ref_chosen, r_l = rejected - ref_rejected and margin m = r_w - r_l:
      sigmoid   -logsigmoid(beta m)                              DPO, Rafailov et al. 2023
                with label_smoothing e: (1-e)(-logsigmoid(beta m)) + e(-logsigmoid(-beta m)),
                cDPO (Mitchell 2023): cross-entropy against a 1-e preference label
      robust    ((1-e)(-logsigmoid(beta m)) - e(-logsigmoid(-beta m))) / (1-2e), rDPO,
                Chowdhury et al. 2024: unbiased when labels are flipped with probability e
      ipo       (m - 1/(2 beta))^2, IPO, Azar et al. 2023. Pass AVERAGE per-token log-probs
                (as TRL does); beta is the paper's tau
      hinge     relu(1 - beta m), SLiC, Zhao et al. 2023
      nca_pair  -logsigmoid(beta r_w) - logsigmoid(-beta r_w)/2 - logsigmoid(-beta r_l)/2,
                NCA, Chen et al. 2024
      bco_pair  -logsigmoid(beta r_w - delta) - logsigmoid(-(beta r_l - delta)), BCO, Jung et
                al. 2024. TRL keeps `delta` as a running mean of the batch rewards; here the
                caller passes it (default 0)
      sppo_hard (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2, SPPO with hard 0/1 win
                probabilities, Wu et al. 2024
      apo_zero  (1 - sigmoid(beta r_w)) + sigmoid(beta r_l), APO-zero, D'Oosterlinck et al. 2024
      apo_down  sigmoid(beta r_w) + (1 - sigmoid(beta m)), APO-down, same paper
      exo_pair  KL(Bernoulli(sigmoid(beta m)) || Bernoulli(1-e)), EXO eq. 16, Ji et al. 2024;
                e = label_smoothing, or 1e-3 when it is 0 (as in TRL)
      sigmoid_norm  -logsigmoid(beta m) on AVERAGE per-token log-probs (pass them, as for IPO):
                length-normalised DPO, the SimPO paper's length argument (Meng et al. 2024) with
                the reference kept; TRL's "sigmoid_norm"
      aot       cDPO's formula on d = sort(c - r) - sort(ref_c - ref_r), each sorted over the
                batch: the policy's distribution of log-odds must dominate the reference's
                quantile by quantile (AOT, Melnyk et al. 2024; TRL's "aot")
      aot_pair  the same on d = sort(r_w) - sort(r_l): chosen log-ratios dominate rejected ones
                without using the pairing (TRL's "aot_unpaired"). For both AOT types, losses[i]
                belongs to the i-th quantile, not to pair i; only the mean means anything
      discopop  (1 - s) * (-logsigmoid(beta m)) + s * exp(-beta m), s = sigmoid(beta m / tau),
                tau = discopop_tau: DiscoPOP's log-ratio modulated loss (Lu et al. 2024, eq. 5)
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios  # m
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - ls)
                  + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "nca_pair":
        losses = (-F.logsigmoid(beta * chosen_logratios)
                  - 0.5 * F.logsigmoid(-beta * chosen_logratios)
                  - 0.5 * F.logsigmoid(-beta * rejected_logratios))
    elif loss_type == "bco_pair":
        losses = (-F.logsigmoid(beta * chosen_logratios - delta)
                  - F.logsigmoid(-(beta * rejected_logratios - delta)))
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * logits))
    elif loss_type == "exo_pair":
        eps = ls if ls > 0 else 1e-3  # the target must not be exactly 0/1, or its log is -inf
        losses = (torch.sigmoid(beta * logits) * (F.logsigmoid(beta * logits) - math.log(1 - eps))
                  + torch.sigmoid(-beta * logits) * (F.logsigmoid(-beta * logits) - math.log(eps)))
    elif loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type in ("aot", "aot_pair"):
        if loss_type == "aot":
            d = (chosen_logps - rejected_logps).sort().values - (ref_chosen_logps - ref_rejected_logps).sort().values
        else:
            d = chosen_logratios.sort().values - rejected_logratios.sort().values
        losses = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
    elif loss_type == "discopop":
        s = torch.sigmoid(beta * logits / discopop_tau)
        losses = (1 - s) * -F.logsigmoid(beta * logits) + s * torch.exp(-beta * logits)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(chosen_avg_logps, rejected_avg_logps, beta=2.0, gamma_beta_ratio=0.5):
    """SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin.

    chosen_avg_logps, rejected_avg_logps [B] (AVERAGE per-token log-probs)
    -> (losses [B], chosen_rewards [B], rejected_rewards [B]), rewards = beta * avg_logps, detached.

    losses = -logsigmoid(beta * (c - r) - gamma), with gamma = gamma_beta_ratio * beta, i.e.
    -logsigmoid(beta * ((c - r) - gamma_beta_ratio)) as in TRL's CPOTrainer.
    """
    logits = (chosen_avg_logps - rejected_avg_logps) - gamma_beta_ratio
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable near 0 (where 1 - exp(x) loses all precision)."""
    return torch.log(-torch.expm1(x))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, beta=0.1):
    """ORPO's odds-ratio term (Hong et al., 2024), which the trainer adds to the chosen NLL.

    chosen_avg_logps, rejected_avg_logps [B] (AVERAGE per-token log-probs, so each is log p with
    p in (0, 1)) -> (losses [B], chosen_rewards [B], rejected_rewards [B], log_odds [B]); rewards
    = beta * avg_logps and log_odds are detached.

    odds(p) = p / (1 - p);  log_odds = log odds(p_w) - log odds(p_l)
            = (c - r) - (log(1 - e^c) - log(1 - e^r));  losses = -beta * logsigmoid(log_odds).
    """
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        _log1mexp(chosen_avg_logps) - _log1mexp(rejected_avg_logps))
    losses = -beta * F.logsigmoid(log_odds)
    return (losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach(),
            log_odds.detach())


def kto_loss(policy_logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0):
    """KTO (Ethayarajh et al., 2024): prospect-theoretic loss on unpaired good/bad completions.

    policy_logps, ref_logps [B] sequence log-probs; desirable bool [B]; kl 0-d tensor, the
    reference point z_0 (TRL: mean over the batch of policy - ref log-probs on mismatched
    prompt/completion pairs, gathered across ranks) -> (losses [B], rewards [B] detached).

    With r = policy - ref and z = max(kl, 0) detached (no gradient flows through the baseline):
      desirable:   w_d * (1 - sigmoid(beta * (r - z)))
      undesirable: w_u * (1 - sigmoid(beta * (z - r)))
    TRL's loss is the mean of `losses` over the batch.
    """
    logratios = policy_logps - ref_logps
    z = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratios - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios))))
    return losses, beta * logratios.detach()


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def reward_loss(chosen_scores, rejected_scores, margin=None, center_coef=0.0):
    """Bradley-Terry pairwise loss for a reward model (Ouyang et al., 2022), as in TRL.

    chosen_scores, rejected_scores [B]; margin [B] or None (Llama 2's preference-strength margin,
    Touvron et al. 2023) -> (loss scalar, accuracy scalar detached).

    loss = mean(-logsigmoid(chosen - rejected - margin)) + center_coef * mean((chosen + rejected)^2)
    The centering term (Eisenstein et al., 2023) pulls the scores towards zero mean, since the BT
    loss only sees differences.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_scores + rejected_scores) ** 2).mean()
    accuracy = (chosen_scores > rejected_scores).to(diff.dtype).mean().detach()
    return loss, accuracy


# ---------------------------------------------------------------------------------------------
# RL: KL penalties, masked statistics, advantages
# ---------------------------------------------------------------------------------------------


def kl_penalty(logps, ref_logps, kind="k1"):
    """Per-token estimators of KL(policy || ref) from samples of the policy (Schulman, 2020,
    "Approximating KL Divergence"). logps, ref_logps [B, T] -> [B, T], no reduction.

      k1 = logp - ref                      unbiased, can be negative (PPO-RLHF reward penalty)
      k2 = (logp - ref)^2 / 2              biased, low variance, >= 0
      k3 = exp(ref - logp) - (ref - logp) - 1   unbiased, >= 0 (GRPO's KL term)
    """
    log_ratio = logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown kl kind {kind!r}; expected 'k1', 'k2' or 'k3'")


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1. x, mask [B, T]; dim None (all) or an int.

    An all-zero mask (or row) gives 0 rather than nan.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_whiten(x, mask, shift_mean=True, mean=None, var=None):
    """Normalise x to zero mean and unit variance over the masked positions (as TRL).

    x, mask [B, T] -> [B, T], zero outside the mask. The variance is unbiased (n - 1); with
    shift_mean=False the original mean is added back (only the scale changes). `mean` and `var`
    (floats or 0-d tensors) replace the moments of this x: pass those of the whole global batch
    to whiten every rank's share alike (REINFORCE++).
    """
    mask = mask.to(x.dtype)
    if mean is None:
        mean = masked_mean(x, mask)
    if var is None:
        n = mask.sum()
        var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation (Schulman et al., 2016) for right-padded sequences, over
    the masked positions only: a multi-turn episode's mask has holes (tool results, template
    glue) that are not the model's actions, and the recursion steps over them (t+1 = the next
    masked position), as if they were not there.

    rewards [B, T] per-token rewards (in RLHF: -kl_coef * KL per token, plus the reward model's
    score on the last completion token), values [B, T] critic values, mask [B, T] right-padded
    -> (advantages [B, T], returns [B, T]), zero outside the mask; returns = advantages + values.

      delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    with V and A taken as 0 after the last valid token (the episode ends there).
    Pass detached values: these are regression targets, not something to differentiate.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        next_adv = torch.where(m > 0, adv, next_adv)  # a hole keeps the later position's values
        next_value = torch.where(m > 0, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def discounted_returns(rewards, mask, gamma=1.0):
    """Returns-to-go of right-padded per-token rewards: G_t = r_t + gamma * G_{t+1}, zero after the
    last valid token. rewards, mask [B, T] -> [B, T], zero outside the mask; t+1 is the next masked
    position (holes in a multi-turn mask are stepped over, as in `gae`).

    REINFORCE++'s advantages before normalisation (Hu, 2025): with the KL penalty in the
    per-token rewards and the (baselined) score on the last token, G_t is the score minus the
    KL still to come from token t on. `gae` with lam = 1 and zero values is the same thing.
    """
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        out[:, t] = (rewards[:, t] + gamma * running) * m
        running = torch.where(m > 0, out[:, t], running)
    return out


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """GRPO's group-relative advantages (Shao et al., 2024, DeepSeekMath).

    rewards [N] for N = prompts * group_size, laid out as consecutive groups of the same prompt
    -> advantages [N]. A = (r - mean_group) / (std_group + eps), std unbiased (torch.std, as TRL).
    scale=False drops the division (Dr. GRPO, Liu et al., 2025: the std rescaling biases learning
    towards too easy and too hard prompts).
    """
    r = rewards.view(-1, group_size)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


def rloo_advantages(rewards, group_size):
    """REINFORCE Leave-One-Out (Kool et al., 2019; Ahmadian et al., 2024).

    rewards [N], consecutive groups of group_size >= 2 -> advantages [N]:
    A_i = r_i - mean of the other group_size - 1 rewards of its group (an unbiased baseline).
    """
    r = rewards.view(-1, group_size)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).view(-1)


# ---------------------------------------------------------------------------------------------
# RL: policy and value losses
# ---------------------------------------------------------------------------------------------


def policy_gradient_loss(per_token_loss, mask, agg="dapo", max_len=None, num_tokens=None, num_sequences=None):
    """Reduce a per-token loss [B, T] with mask [B, T] to a scalar; the choice matters.

      grpo     mean over each sequence's tokens, then mean over sequences (GRPO, Shao et al.
               2024): a token in a long answer weighs less than one in a short answer
      dr_grpo  sum over all tokens / (B * max_len), a constant (Dr. GRPO, Liu et al. 2025);
               max_len is the maximum completion length, default T
      dapo     sum over all tokens / number of tokens, the token-level mean (DAPO, Yu et al. 2025)

    num_tokens (dapo) and num_sequences (grpo, dr_grpo) replace this batch's token and sequence
    counts: pass those of the whole optimizer step across micro-batches and ranks so that every
    token (every sequence) weighs the same wherever it is; see `sft_loss` and loop.accumulate.
    """
    mask = mask.to(per_token_loss.dtype)
    B, T = mask.shape
    if agg == "grpo":
        return masked_mean(per_token_loss, mask, dim=-1).sum() / (num_sequences or B)
    if agg == "dr_grpo":
        return (per_token_loss * mask).sum() / ((num_sequences or B) * (max_len or T))
    if agg == "dapo":
        return masked_mean(per_token_loss, mask) if num_tokens is None else (per_token_loss * mask).sum() / num_tokens
    raise ValueError(f"unknown agg {agg!r}; expected 'grpo', 'dr_grpo' or 'dapo'")


def ppo_policy_loss(logps, old_logps, advantages, mask, clip_eps=0.2, clip_eps_high=None,
                    agg="dapo", max_len=None, num_tokens=None, level="token", num_sequences=None):
    """PPO's clipped surrogate objective (Schulman et al., 2017), as a loss to minimise.

    logps [B, T] current policy; old_logps [B, T] detached, from the policy that sampled;
    advantages [B, T] token-level (GRPO/RLOO broadcast a sequence advantage over its tokens);
    mask [B, T] -> (loss scalar, stats dict of detached scalars).

      ratio = exp(logps - old_logps)
      per-token loss = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))
    clip_eps_high defaults to clip_eps; a larger one is DAPO's "clip-higher" (Yu et al., 2025).
    The per-token loss is reduced by `policy_gradient_loss(agg, max_len, num_tokens, num_sequences)`: the default
    "dapo" is the token mean over the mask (PPO); GRPO uses agg="grpo" or "dr_grpo".

    level="sequence" is GSPO (Zheng et al., 2025, eq. 7): the log-ratio is first replaced by its
    mean over each sequence's masked tokens, s_i = exp(mean_t log_ratio), so a sequence is
    clipped (or not) as a whole and every token of it gets the same weight s_i. GSPO's clip
    ranges are therefore tiny (3e-4 / 4e-4 in the paper) and its aggregation is agg="grpo".

    stats: clipfrac (fraction of tokens where the clipped term is active), approx_kl (the k3
    estimator of KL(old || new), >= 0), ratio_mean.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logps - old_logps
    if level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=-1)[:, None].expand_as(log_ratio)
    elif level != "token":
        raise ValueError(f"unknown level {level!r}; expected 'token' or 'sequence'")
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    loss = policy_gradient_loss(torch.maximum(unclipped, clipped), mask, agg, max_len, num_tokens, num_sequences)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def cispo_loss(logps, old_logps, advantages, mask, max_ratio=5.0, agg="dapo", max_len=None, num_tokens=None,
               num_sequences=None):
    """CISPO (MiniMax-M1, 2025): REINFORCE with a clipped, stop-gradient importance weight.

    logps [B, T] current policy; old_logps [B, T] detached; advantages [B, T]; mask [B, T]
    -> (loss scalar, stats dict of detached scalars).

      per-token loss = -sg(min(ratio, max_ratio)) * A * logps,   ratio = exp(logps - old_logps)
    Unlike PPO's clip, which zeroes the gradient of clipped tokens, every token keeps its
    gradient A * grad(logps); only its weight is capped (TRL: loss_type="cispo", epsilon_high
    as max_ratio). Reduced by `policy_gradient_loss` (DAPO's token mean, as in the paper).
    stats: clipfrac (fraction of tokens whose weight was capped), ratio_mean.
    """
    ratio = torch.exp(logps - old_logps)
    weight = torch.clamp(ratio, max=max_ratio).detach()
    loss = policy_gradient_loss(-weight * advantages * logps, mask, agg, max_len, num_tokens, num_sequences)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((ratio > max_ratio).to(ratio.dtype), mask),
                 "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def sapo_loss(logps, old_logps, advantages, mask, tau_pos=1.0, tau_neg=1.05, agg="grpo", max_len=None,
              num_tokens=None, num_sequences=None):
    """SAPO (Gao et al., 2025, "Soft Adaptive Policy Optimization"): a smooth sigmoid gate in
    place of PPO's hard clip.

    logps [B, T] current policy; old_logps [B, T] detached; advantages [B, T]; mask [B, T]
    -> (loss scalar, stats dict of detached scalars).

      per-token loss = -sigmoid(tau * (ratio - 1)) * 4 / tau * A,   tau = tau_pos if A > 0 else tau_neg
    At ratio = 1 the gate's gradient is exactly A * grad(logps) (sigmoid'(0) * 4 = 1), as in
    PPO; away from 1 it decays smoothly instead of dropping to 0. The larger tau_neg damps
    negative-advantage tokens faster (TRL: loss_type="sapo", sapo_temperature_pos/neg).
    stats: ratio_mean.
    """
    ratio = torch.exp(logps - old_logps)
    tau = torch.where(advantages > 0, torch.as_tensor(tau_pos, dtype=ratio.dtype, device=ratio.device),
                      torch.as_tensor(tau_neg, dtype=ratio.dtype, device=ratio.device))
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    loss = policy_gradient_loss(-gate * advantages, mask, agg, max_len, num_tokens, num_sequences)
    with torch.no_grad():
        stats = {"ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip=0.2, num_tokens=None):
    """PPO's clipped value loss (as in OpenAI's baselines and TRL's PPO).

    values [B, T] current critic; old_values [B, T] critic at rollout time; returns [B, T] GAE
    targets; mask [B, T] -> (loss scalar, stats dict {vf_clipfrac}).

      v_clip = old + clip(values - old, -clip, clip)
      loss = 0.5 * masked_mean(max((values - R)^2, (v_clip - R)^2))
    num_tokens replaces the batch's token count in the mean (the whole step's: loop.accumulate).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    worst = torch.maximum(unclipped, clipped)
    loss = 0.5 * (masked_mean(worst, mask) if num_tokens is None else (worst * mask.to(worst.dtype)).sum() / num_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats
