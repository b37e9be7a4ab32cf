"""
What the scripts compute with a model besides the loss: log-probs of tokens, sequences and
completions, reward-model scores and critic values, and batched generation (evaluation, the
built-in task's preference pairs, RL rollouts).

One shift convention everywhere: `labels[b, t]` is the token that position t predicts (built once,
in data/batching.py); for generated sequences position P - 1 + i predicts completion token i, and
completion_logps is the one place that shifts them. Only positions that are scored go through the
LM head, a chunk at a time (losses.logprobs_from_hidden): no [B, T, V] logits ever exist.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch

import common
import losses
import model as M
from data import batching, chat


# ----------------------------------------------------------------------------- log-probs of data

def token_logps(model, batch, dist, chunk_size, packed=False):
    """Per-token log-probs [B, T] of batch["labels"] where batch["loss_mask"] is set (0 elsewhere),
    and the mask. Only the masked positions go through the LM head, in chunks, so neither
    [B, T, V] fp32 logits nor the head's cost on prompt tokens are ever paid."""
    b = {k: v.to(dist.device) for k, v in batch.items()}
    sel = b["loss_mask"] > 0

    def head(h, w):
        out = torch.zeros(sel.shape, dtype=torch.float32, device=h.device)
        # batch["index"] (shared-prompt preference rows): where in the flattened [B * T] hidden
        # states each label's predicting position is; otherwise labels line up with positions.
        hs = h.flatten(0, 1)[b["index"][sel]] if "index" in b else h[sel]
        out[sel] = losses.logprobs_from_hidden(hs, w, b["labels"][sel], chunk_size)
        return out

    # Right-padded rows need no mask (padding comes after every real token, so causal attention
    # never reaches it) and take SDPA's fast causal path; packed and shared-prompt rows need theirs.
    mask = b["attention_mask"] if packed or "index" in b else None
    with common.autocast(dist):
        logps = model(b["input_ids"], mask, b["position_ids"], head_fn=head)
    return logps, b["loss_mask"]


class SequenceLogps(NamedTuple):
    sum: torch.Tensor     # [N] summed over each row's completion tokens
    mean: torch.Tensor    # [N] the same over the row's completion length
    tokens: torch.Tensor  # [N, T] per token (0 off the completion)
    mask: torch.Tensor    # [N, T] the completion tokens


def sequence_logps(model, batch, dist, chunk_size) -> SequenceLogps:
    """Completion log-probs per row of a preference batch (rows [chosen; rejected])."""
    logps, mask = token_logps(model, batch, dist, chunk_size)
    total = (logps * mask).sum(-1)
    return SequenceLogps(total, total / mask.sum(-1).clamp(min=1), logps, mask)


def pair_scores(model, batch, dist):
    """A score-head model's scores [2n] of rows [chosen; rejected], each read at the row's last real
    token, as transformers' *ForSequenceClassification does."""
    b = {k: v.to(dist.device) for k, v in batch.items()}
    with common.autocast(dist):
        scores = model(b["input_ids"], None, b["position_ids"])  # right padding: the causal mask suffices
    last = b["attention_mask"].gt(0).sum(-1) - 1
    return scores.float()[torch.arange(scores.shape[0], device=dist.device), last]


# ----------------------------------------------------------------------------- generation

@dataclass
class Samples:
    """Completions generated after left-padded prompts."""
    seqs: torch.Tensor    # [N, P + L] prompt then completion tokens
    attn: torch.Tensor    # [N, P + L] 1 on real tokens (prompt and completion)
    mask: torch.Tensor    # [N, L] float, 1 on completion tokens up to and including the first stop token
    prompt_len: int       # P
    texts: list           # the completions decoded, special tokens skipped
    ended: torch.Tensor   # [N] bool: the completion emitted a stop token (else it was cut at the length cap)
    episodes: object = None  # multi-turn: agent.Episodes (mask then marks the model's turns only)


def generate(model, tok, prompts, dist, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             group=1) -> Samples:
    """Completions to `prompts` (lists of token ids), batched, with the KV cache; the model is left
    in the train/eval mode it had. Call it inside `common.unsharded(model)`, held over all of a
    rank's calls: ranks decode different lengths and numbers of batches, so no per-layer
    collective may run in here."""
    ids, pmask = batching.collate_prompts(prompts, tok.pad_id)
    ids, pmask = ids.to(dist.device), pmask.to(dist.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), common.autocast(dist):
        seqs, cmask = M.generate(model, ids, pmask, max_new_tokens, temperature, top_k or None, top_p,
                                 eos_ids=tok.stop_ids, pad_id=tok.pad_id, generator=generator, group=group)
    model.train(was_training)
    P = ids.shape[1]
    rows, keep = seqs[:, P:].tolist(), cmask.tolist()
    completions = [[t for t, k in zip(r, m) if k] for r, m in zip(rows, keep)]
    texts = [tok.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    stops = set(tok.stop_ids)
    ended = torch.tensor([bool(stops.intersection(c)) for c in completions], device=dist.device)
    return Samples(seqs, torch.cat([pmask, cmask], 1), cmask.float(), P, texts, ended)


def eval_accuracy(model, tok, records, dist, is_correct, max_new_tokens, batch_size=64):
    """Exact-match accuracy of greedy answers to `records` ({"prompt", "answer"}), split over ranks."""
    mine, correct = records[dist.rank::dist.world], 0
    with common.unsharded(model):
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            out = generate(model, tok, [chat.tokenize_prompt(r, tok, 10**9) for r in chunk], dist, max_new_tokens,
                           temperature=0)
            correct += sum(bool(is_correct(text, r["answer"])) for r, text in zip(chunk, out.texts))
    return common.all_sum(correct, dist) / max(len(records), 1)


# ----------------------------------------------------------------------------- log-probs of samples

def completion_logps(model, samples: Samples, dist, chunk_size, temperature=1.0, entropy=False, rows=None,
                     group=1):
    """Log-probs [N, L] of the completion tokens under `model` (and, optionally, the per-token
    entropy [N, L]), for all samples or the `rows` given. Position P - 1 + i predicts completion
    token i. The distribution is the one the rollout sampled from, softmax(logits / temperature)
    (hidden / T through the linear head is logits / T; greedy rollouts: the untempered one);
    top-k/top-p truncation is not modelled, as in TRL.
    group > 1: where every run of `group` rows shares one prompt (GRPO's groups), each prompt is
    computed once (shared_prompt_rows): the same values, (G - 1) * P fewer tokens per group."""
    seqs, attn = (samples.seqs, samples.attn) if rows is None else (samples.seqs[rows], samples.attn[rows])
    P, temperature = samples.prompt_len, temperature or 1.0
    labels = seqs[:, P:]  # position P - 1 + i predicts completion token i
    shared = shared_prompt_rows(seqs, attn, P, group) if group > 1 and samples.episodes is None else None

    def head(h, w):
        h = (h[:, P - 1:-1] if shared is None else h.flatten(0, 1)[shared["index"]]) / temperature
        lp = losses.logprobs_from_hidden(h, w, labels, chunk_size)
        # entropy is a metric: detached, so that a training forward keeps no graph of its [chunk, V] logits
        return (lp, losses.entropy_from_hidden(h.detach(), w.detach(), chunk_size)) if entropy else lp

    with common.autocast(dist):
        if shared is None:
            return model(seqs, attn, head_fn=head)
        return model(shared["input_ids"], shared["attention_mask"], shared["position_ids"], head_fn=head)


def shared_prompt_rows(seqs, attn, P, G):
    """Rows [N, P + L] (left-padded prompts, right-padded completions) whose prompts repeat in runs
    of G -> one row per run, [N / G, P + G * L]: the prompt once, then its G completions, each
    attending to the prompt and to itself only, its positions continuing the prompt's. Returns
    input_ids, position_ids, a bool attention_mask [N / G, 1, T, T] and index [N, L], the flat
    position in [N / G * T] whose hidden state predicts each completion token. None when the rows
    do not come in such runs. A causal model gives every real token the same hidden state as in
    the unshared rows, as collate_preference_shared does for DPO's pairs."""
    N, L = seqs.shape[0], seqs.shape[1] - P
    if not (M.in_runs(seqs[:, :P], G) and M.in_runs(attn[:, :P], G)):
        return None
    B, T, dev = N // G, P + G * L, seqs.device
    ids = torch.cat([seqs[::G, :P], seqs[:, P:].reshape(B, G * L)], 1)
    a_prompt, a_comp = attn[::G, :P], attn[:, P:].reshape(B, G, L)
    real = torch.cat([a_prompt, a_comp.reshape(B, G * L)], 1).bool()
    pos_prompt = (a_prompt.cumsum(1) - 1).clamp(min=0)  # as model.hidden_states counts them from a 2-D mask
    pos_comp = (a_prompt.sum(1)[:, None, None] + a_comp.cumsum(2) - 1).clamp(min=0).reshape(B, G * L)
    seg = torch.cat([torch.zeros(P, dtype=torch.long, device=dev), torch.arange(1, G + 1, device=dev).repeat_interleave(L)])
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    sees = causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))  # [T, T]: the prompt, or its own completion
    mask = sees[None] & real[:, None, :] | torch.eye(T, dtype=torch.bool, device=dev)  # a pad sees itself (no empty row)
    at = torch.arange(L, device=dev)
    local = torch.where(at == 0, P - 1, P + torch.arange(G, device=dev)[:, None] * L + at - 1)  # [G, L]
    index = (torch.arange(B, device=dev)[:, None, None] * T + local).reshape(N, L)
    return {"input_ids": ids, "position_ids": torch.cat([pos_prompt, pos_comp], 1), "attention_mask": mask[:, None],
            "index": index}


def completion_values(critic, samples: Samples, dist, rows=None):
    """A critic's values [N, L]: its estimate at the state before each completion token."""
    seqs, attn = (samples.seqs, samples.attn) if rows is None else (samples.seqs[rows], samples.attn[rows])
    with common.autocast(dist):
        return critic(seqs, attn)[:, samples.prompt_len - 1:-1].float()


def reward_model_scores(rm, samples: Samples, dist):
    """A reward model's score [N] of each sequence, read at its last real token (prompts are
    left-padded and the rest right-padded: the last position where attn is 1)."""
    last = samples.attn.shape[1] - 1 - samples.attn.flip(-1).argmax(-1)
    with common.autocast(dist):
        return rm(samples.seqs, samples.attn)[torch.arange(len(last), device=dist.device), last].float()
