"""
What the scripts compute with a model besides the loss: log-probs of tokens, sequences and
completions, reward-model scores and critic values (generation is engine.py's).

One shift convention everywhere: `labels[b, t]` is the token that position t predicts (built once,
in data/batching.py); for generated sequences position P - 1 + i predicts completion token i, and
completion_logps is the one place that shifts them. Only positions that are scored go through the
LM head, a chunk at a time (losses.logprobs_from_hidden): no [B, T, V] logits ever exist.
"""
from typing import NamedTuple

import torch

import common
import engine
import losses
from data import batching


# ----------------------------------------------------------------------------- log-probs of data

def to_device(batch, device):
    """A host batch {name: tensor} on `device`. On CUDA each tensor goes through pinned memory
    with a non-blocking copy: the host does not wait for the transfer, and the forward's kernels
    are queued behind it on the same stream (the caching host allocator keeps each pinned buffer
    until its copy is done)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if v.device.type == "cpu" else v.to(device)
            for k, v in batch.items()}


def token_logps(model, batch, dist, chunk_size, packed=False):
    """Per-token log-probs [B, T] of batch["labels"] where batch["loss_mask"] is set (0 elsewhere),
    and the mask. Only the masked positions go through the LM head, in chunks, so neither
    [B, T, V] fp32 logits nor the head's cost on prompt tokens are ever paid."""
    # The scored positions are known on the host: their indices are found there, before the
    # transfer, so that the head's gather and scatter have no data-dependent shape (boolean
    # indexing on the GPU would wait for it to count them).
    sel = batch["loss_mask"] > 0
    dst = sel.flatten().nonzero().squeeze(1)  # flat positions in [B, T] (loss_mask's shape) of the scored tokens
    # batch["index"] (shared-prompt preference rows): where in the flattened [B * T] hidden states
    # each label's predicting position is; otherwise labels line up with positions.
    src = batch["index"].flatten()[dst] if "index" in batch else dst
    # Right-padded rows need no mask (padding comes after every real token, so causal attention
    # never reaches it) and take SDPA's fast causal path; packed and shared-prompt rows need theirs,
    # the shared-prompt one built here, on the device, when the batch carries segment ids.
    masks = ["segments"] if "segments" in batch else ["attention_mask"] if packed or "index" in batch else []
    b = to_device({**{k: batch[k] for k in ["input_ids", "position_ids", "loss_mask"] + masks},
                   "dst": dst, "src": src, "labels": batch["labels"].flatten()[dst]}, dist.device)
    mask = batching.shared_prompt_mask(b["segments"]) if "segments" in b else b.get("attention_mask")

    def head(h, w):
        lp = losses.logprobs_from_hidden(h.flatten(0, 1).index_select(0, b["src"]), w, b["labels"], chunk_size)
        out = torch.zeros(sel.shape, dtype=torch.float32, device=h.device)
        out.view(-1).index_put_((b["dst"],), lp)  # returned whole, not as a view: FSDP2 warns about one
        return out

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
    b = to_device(batch, dist.device)
    with common.autocast(dist):
        scores = model(b["input_ids"], None, b["position_ids"])  # right padding: the causal mask suffices
    last = b["attention_mask"].gt(0).sum(-1) - 1
    return scores.float()[torch.arange(scores.shape[0], device=dist.device), last]


# ----------------------------------------------------------------------------- log-probs of samples

def completion_logps(model, samples, dist, chunk_size, temperature=1.0, entropy=False, rows=None,
                     group=1):
    """Log-probs [N, L] of the completion tokens under `model` (and, optionally, the per-token
    entropy [N, L]), for all samples or the `rows` given. Position P - 1 + i predicts completion
    token i. The distribution is the one the rollout sampled from, softmax(logits / temperature)
    (hidden / T through the linear head is logits / T; greedy rollouts: the untempered one);
    top-k/top-p truncation is not modelled, as in TRL.
    group > 1: where every run of `group` rows shares one prompt (GRPO's groups), each prompt is
    computed once (shared_prompt_rows): the same values, (G - 1) * P fewer tokens per group.
    `rows` are then whole runs: where the engine says the samples come in runs of `group`
    (samples.group), that is not checked again (a check waits for the device)."""
    seqs, attn = (samples.seqs, samples.attn) if rows is None else (samples.seqs[rows], samples.attn[rows])
    P, temperature = samples.prompt_len, temperature or 1.0
    labels = seqs[:, P:]  # position P - 1 + i predicts completion token i
    shared = None
    if group > 1 and samples.episodes is None:
        shared = shared_prompt_rows(seqs, attn, P, group, checked=getattr(samples, "group", 1) == group)

    def head(h, w):
        h = (h[:, P - 1:-1] if shared is None else h.flatten(0, 1)[shared["index"]]) / temperature
        lp = losses.logprobs_from_hidden(h, w, labels, chunk_size)
        # entropy is a metric: detached, so that a training forward keeps no graph of its [chunk, V] logits
        return (lp, losses.entropy_from_hidden(h.detach(), w.detach(), chunk_size)) if entropy else lp

    with common.autocast(dist):
        if shared is None:
            return model(seqs, attn, head_fn=head)
        return model(shared["input_ids"], shared["attention_mask"], shared["position_ids"], head_fn=head)


def shared_prompt_rows(seqs, attn, P, G, checked=False):
    """Rows [N, P + L] (left-padded prompts, right-padded completions) whose prompts repeat in runs
    of G -> one row per run, [N / G, P + G * L]: the prompt once, then its G completions, each
    attending to the prompt and to itself only, its positions continuing the prompt's. Returns
    input_ids, position_ids, a bool attention_mask [N / G, 1, T, T] and index [N, L], the flat
    position in [N / G * T] whose hidden state predicts each completion token. None when the rows
    do not come in such runs (`checked`: known to, not checked). A causal model gives every real
    token the same hidden state as in the unshared rows, as collate_preference_shared does for
    DPO's pairs."""
    N, L = seqs.shape[0], seqs.shape[1] - P
    if not checked and not (engine.in_runs(seqs[:, :P], G) and engine.in_runs(attn[:, :P], G)):
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


def completion_values(critic, samples, dist, rows=None):
    """A critic's values [N, L]: its estimate at the state before each completion token."""
    seqs, attn = (samples.seqs, samples.attn) if rows is None else (samples.seqs[rows], samples.attn[rows])
    with common.autocast(dist):
        return critic(seqs, attn)[:, samples.prompt_len - 1:-1].float()


def reward_model_scores(rm, samples, dist):
    """A reward model's score [N] of each sequence, read at its last real token (prompts are
    left-padded and the rest right-padded: the last position where attn is 1)."""
    last = samples.attn.shape[1] - 1 - samples.attn.flip(-1).argmax(-1)
    with common.autocast(dist):
        return rm(samples.seqs, samples.attn)[torch.arange(len(last), device=dist.device), last].float()
