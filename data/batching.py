"""
Token lists -> tensors. The one place where the next-token shift happens:

    labels[b, t] = input_ids[b, t + 1]      (the token position t predicts; the last is pad)
    loss_mask[b, t] = 1 iff token t + 1 is trainable

attention_mask is 0 on padding and a document id (1, 2, ...) on real tokens: model.py attends
within a document only, so packed rows need nothing else. Sequences are right-padded for training
and left-padded for generation.

Batches are staged on the host: every tensor here names device="cpu", so that it stays there
whatever torch's default device is (tests/test_devices.py runs the scripts with it set to meta);
forward.to_device moves a batch to where it is computed.
"""
import torch

from .formats import DataError


def _shift(ids, mask, pad_id):
    return ids[1:] + [pad_id], mask[1:] + [0]


def _stack(rows, pad_id):
    """Right-pad dict rows of lists (input_ids, labels, loss_mask, attention_mask, position_ids)."""
    T = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "labels": pad_id, "loss_mask": 0, "attention_mask": 0, "position_ids": 0}
    out = {k: torch.tensor([r[k] + [v] * (T - len(r[k])) for r in rows], device="cpu") for k, v in fill.items()}
    out["loss_mask"] = out["loss_mask"].float()
    return out


def _row(ids, trainable, pad_id):
    labels, mask = _shift(ids, trainable, pad_id)
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "attention_mask": [1] * len(ids),
            "position_ids": list(range(len(ids)))}


def collate_sft(examples, pad_id):
    """examples: [{"input_ids", "loss_mask"}] -> right-padded batch of [B, T] tensors."""
    return _stack([_row(e["input_ids"], e["loss_mask"], pad_id) for e in examples], pad_id)


def pack_sft(examples, seq_len, pad_id):
    """Pack examples, in order, into rows of seq_len tokens (a new row when the next one does not
    fit; an example longer than seq_len is cut to seq_len). Each document gets its own id in
    attention_mask and positions from 0; the last token of a document never predicts the first
    of the next (its loss_mask is 0). Returns a [R, seq_len] batch."""
    rows, cur = [], None
    for e in examples:
        ids, m = e["input_ids"][:seq_len], e["loss_mask"][:seq_len]
        if cur is None or len(cur["input_ids"]) + len(ids) > seq_len:
            cur = {"input_ids": [], "labels": [], "loss_mask": [], "attention_mask": [], "position_ids": []}
            rows.append(cur)
        doc = _row(ids, m, pad_id)
        doc["attention_mask"] = [max(cur["attention_mask"], default=0) + 1] * len(ids)
        for k in cur:
            cur[k] += doc[k]
    batch = _stack(rows, pad_id)
    if batch["input_ids"].shape[1] < seq_len:  # every row is exactly seq_len tokens
        extra = seq_len - batch["input_ids"].shape[1]
        batch = {k: torch.nn.functional.pad(v, (0, extra), value=pad_id if k in ("input_ids", "labels") else 0)
                 for k, v in batch.items()}
    return batch


def collate_preference(examples, pad_id):
    """examples: [{"prompt_ids", "chosen_ids", "rejected_ids"}] -> one batch of 2B rows,
    [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}], each prompt + completion;
    loss_mask marks the positions that predict completion tokens."""
    rows = [_row(e["prompt_ids"] + e[k], [0] * len(e["prompt_ids"]) + [1] * len(e[k]), pad_id)
            for k in ("chosen_ids", "rejected_ids") for e in examples]
    return _stack(rows, pad_id)


def collate_preference_shared(examples, pad_id, segments=False):
    """The same pairs as collate_preference, with each prompt computed once: row i is
    prompt_i + chosen_i + rejected_i, and the rejected tokens attend to the prompt and to
    themselves, never to the chosen ones (positions restart after the prompt). Same outputs for a
    causal model, ~(P + 2R) / (2P + 2R) of the work.

    Returns input_ids / position_ids [B, L], attention_mask as a bool [B, 1, L, L] mask, and for
    the 2B sequences [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]: labels and loss_mask
    [2B, R] plus index [2B, R], the flat position in [B * L] whose hidden state predicts each label
    (the last prompt position predicts the first token of both answers).
    segments=True: segment ids [B, L] (0 pad, 1 prompt, 2 chosen, 3 rejected) in place of the mask,
    for the consumer to build it where it computes (shared_prompt_mask; forward.token_logps does,
    on the run's device): B * L * L bytes are neither built on the host nor copied."""
    rows, seqs = [], []
    for e in examples:
        p, c, r = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
        P, C = len(p), len(c)
        rows.append((p + c + r, list(range(P + C)) + list(range(P, P + len(r))), [1] * P + [2] * C + [3] * len(r)))
        seqs.append((c, [P - 1] + list(range(P, P + C - 1))))
        seqs.append((r, [P - 1] + list(range(P + C, P + C + len(r) - 1))))
    seqs = seqs[0::2] + seqs[1::2]  # chosen first, then rejected, as collate_preference
    L, R = max(len(ids) for ids, _, _ in rows), max(len(t) for t, _ in seqs)
    ids = torch.tensor([r[0] + [pad_id] * (L - len(r[0])) for r in rows], device="cpu")
    pos = torch.tensor([r[1] + [0] * (L - len(r[1])) for r in rows], device="cpu")
    seg = torch.tensor([r[2] + [0] * (L - len(r[2])) for r in rows], device="cpu")
    B = len(examples)
    index = torch.tensor([[(i % B) * L + j for j in at] + [0] * (R - len(at)) for i, (_, at) in enumerate(seqs)],
                         device="cpu")
    labels = torch.tensor([t + [pad_id] * (R - len(t)) for t, _ in seqs], device="cpu")
    loss_mask = torch.tensor([[1.0] * len(t) + [0.0] * (R - len(t)) for t, _ in seqs], device="cpu")
    mask = {"segments": seg} if segments else {"attention_mask": shared_prompt_mask(seg)}
    return {"input_ids": ids, "position_ids": pos, **mask, "index": index, "labels": labels, "loss_mask": loss_mask}


def shared_prompt_mask(segments):
    """The bool attention mask [B, 1, L, L] of collate_preference_shared's rows from their segment
    ids [B, L], on their device: causal, each token sees the prompt and its own answer, and a pad
    sees itself (no empty row)."""
    L, dev = segments.shape[1], segments.device
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    sq, sk = segments[:, :, None], segments[:, None, :]
    return (causal & (sk > 0) & ((sk == 1) | (sk == sq)) | torch.eye(L, dtype=torch.bool, device=dev))[:, None]


def collate_prompts(prompts, pad_id):
    """Left-padded prompt ids [B, P] and attention mask [B, P] for generation."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device="cpu")
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device="cpu")
    return ids, mask


def batch_indices(n, batch_size, seed, step, rank=0, world=1):
    """This rank's example indices for optimizer step `step`: a pure function of its arguments,
    so resuming needs only the step. Each epoch is a fresh seeded permutation cut into global
    batches of batch_size * world (the last incomplete one is dropped); rank r takes slice r."""
    per_step = batch_size * world
    steps_per_epoch = n // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{n} examples are fewer than one global batch ({batch_size} x {world} processes): "
                        "lower --batch-size, or give more data")
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, device="cpu", generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = k * per_step + rank * batch_size
    return perm[start:start + batch_size].tolist()
