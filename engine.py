"""
The one generation engine: evaluation, the built-in task's preference pairs, RL rollouts,
multi-turn episodes and generate.py all sample through it, and nothing else runs the model token
by token (tests/test_structure.py checks that).

The interface, which a second backend (an inference server) implements too:

    engine = Engine(model, tok, dist)
    engine.generate(prompts, sampling, generator, group) -> Samples   prompts: lists of token ids
    engine.episodes(records, make_env, sampling, max_turns, generator) -> Samples   multi-turn (agent.py)
    engine.load_weights(state)     the trainer's new weights; the own engine samples with the
                                   trainer's own modules, so it has nothing to load

Samples hold the sampled ids (never decoded and re-encoded) with their sampling log-probs, which RL
keeps as the behaviour policy's. Call the engine inside `common.unsharded(model)` held over all of
a rank's calls: ranks decode different lengths and numbers of batches, so no per-layer collective
may run in here.

The stages, named as gpt-fast names them:

    prefill(model, cache, ids, real)           T tokens after what the cache holds -> last logits
    decode_one_token(model, cache, tok, live)  one token per row; a finished row writes a hole
    decode_n_tokens(model, cache, logits, ...) the one sampling loop: sample, stop, feed, repeat

The KV cache is preallocated and written in place: per layer (k, v) [B, kv heads, slots, head dim]
over one slot axis shared by the rows, and `real` [B, slots], 1 where a slot holds a token and 0
for a hole (left padding, a glue's padding, a finished row). A multi-turn episode continues in the
same cache: its glue is prefilled after the cached tokens and decoding resumes.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import agent
import collectives
import common
from data import batching, chat


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off


@dataclass
class Samples:
    """Completions generated after left-padded prompts."""
    seqs: torch.Tensor    # [N, P + L] prompt then completion tokens
    attn: torch.Tensor    # [N, P + L] 1 on real tokens (prompt and completion)
    mask: torch.Tensor    # [N, L] float, 1 on completion tokens up to and including the first stop token
    prompt_len: int       # P
    texts: list           # the completions decoded, special tokens skipped
    ended: torch.Tensor   # [N] bool: the completion emitted a stop token (else it was cut at the length cap)
    episodes: object = None  # multi-turn: Episodes (mask then marks the model's turns only)
    logps: torch.Tensor = None  # [N, L] the sampling log-prob of each masked token (0 elsewhere)
    group: int = 1        # the rows come in runs of `group` identical prompts (GRPO's groups), as checked here


# ----------------------------------------------------------------------------- the stages

def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next tokens [B] from logits [B, V], and their log-probs [B] under softmax(logits /
    temperature) (greedy: the untempered one), the distribution completion_logps scores: top-k /
    top-p truncation is not in it, as in TRL."""
    scaled = logits.float() / (temperature or 1.0)
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        tok = _draw(scaled, top_k, top_p, generator)
    return tok, scaled.gather(1, tok[:, None]).squeeze(1) - scaled.logsumexp(-1)


def _draw(logits, top_k, top_p, generator):
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top one always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    # Inverse-CDF sampling: one uniform number per row. torch.multinomial draws one exponential
    # per vocabulary entry ([B, V] random numbers, ~40% of a decode step at batch 64 on a CPU).
    # The CDF is summed in fp64 so that no token's share moves by more than ~1e-12.
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator) * cdf[:, -1:]
    # right=True: a zero-probability token (a flat step of the CDF) is never drawn; the clamp
    # catches u * total rounding up to the total itself (probability ~2^-53)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


class KVCache:
    """Preallocated keys and values of B rows over `slots` slots (see the module docstring)."""

    def __init__(self, cfg, B, slots, dtype, device):
        self.kv = [tuple(torch.empty(B, cfg.num_kv_heads, slots, cfg.head_dim, dtype=dtype, device=device)
                         for _ in "kv") for _ in range(cfg.num_layers)]
        self.real = torch.zeros(B, slots, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=device)  # each row's count of real tokens
        self.length = 0  # slots used

    def reserve(self, T):
        """Room for T more slots; an episode longer than foreseen doubles the slots (a copy)."""
        slots = self.real.shape[1]
        if self.length + T > slots:
            more = max(T, slots)
            self.kv = [tuple(torch.cat([x, x.new_empty(*x.shape[:2], more, x.shape[3])], 2) for x in kv)
                       for kv in self.kv]
            self.real = torch.cat([self.real, self.real.new_zeros(self.real.shape[0], more)], 1)

    def keep(self, rows):
        """Only these rows go on (finished episodes leave the batch)."""
        self.kv = [(k[rows], v[rows]) for k, v in self.kv]
        self.real, self.next_pos = self.real[rows], self.next_pos[rows]


def _last(h, w):
    # the last position only: [B, T, V] logits of a long prompt and a large vocabulary are GBs
    return F.linear(h[:, -1], w)


def prefill(model, cache: KVCache, ids, real, skip_padding=True):
    """ids [B, T] into the next T slots (real [B, T]: 1 a token, 0 a hole; each row's positions
    continue its count of real tokens) -> logits [B, V] at the last slot. skip_padding: every layer
    but attention runs on the real tokens only (a quarter of a batch of left-padded prompts)."""
    pos, T = cache.length, ids.shape[1]
    cache.reserve(T)
    cache.real[:, pos:pos + T] = real
    positions = cache.next_pos[:, None] + (real.cumsum(1) - 1).clamp(min=0)
    cache.next_pos += real.sum(1)
    cache.length += T
    return model(ids, cache.real[:, :pos + T], position_ids=positions, kv_cache=cache.kv, pos=pos, head_fn=_last,
                 skip_padding=skip_padding and T > 1)


def prefill_groups(model, cache: KVCache, ids, real, G):
    """prefill of rows that come in runs of G identical prompts (GRPO's groups): each prompt is
    computed once and its keys and values copied to its run's rows."""
    B, T = ids.shape
    once = KVCache(model.cfg, B // G, T, cache.kv[0][0].dtype, ids.device)
    logits = prefill(model, once, ids[::G], real[::G]).repeat_interleave(G, 0)
    cache.reserve(T)
    for (k, v), (k1, v1) in zip(cache.kv, once.kv):
        k[:, :, :T], v[:, :, :T] = k1.repeat_interleave(G, 0), v1.repeat_interleave(G, 0)
    cache.real[:, :T], cache.next_pos[:] = real, real.sum(1)
    cache.length = T
    return logits


def decode_one_token(model, cache: KVCache, tok, live):
    """tok [B] after the cached tokens -> logits [B, V]; rows not `live` write a hole."""
    return prefill(model, cache, tok[:, None], live[:, None].long(), skip_padding=False)


# How often the sampling loop asks whether every row has stopped: a read of the device's `done`,
# which on a GPU waits for it (~650 kernel launches a token for 1B). On the CPU it costs nothing.
DONE_CHECK_EVERY = {"cpu": 1, "cuda": 8}


def cache_dtype(model, device):
    """The KV cache's dtype: autocast's where it is on (SDPA would cast the keys and values to it
    anyway), else the weights'."""
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def decode_n_tokens(model, cache: KVCache, logits, sampling: Sampling, stop_ids, pad_id, generator=None):
    """The sampling loop, from the logits of each row's next token: sample, mark the rows that
    emitted a stop token, feed the token, for up to sampling.max_new_tokens tokens (fewer once
    every row has stopped). Returns tokens [B, n] (pad_id after a row's stop), their log-probs
    [B, n], live [B, n] (the row had not stopped before: the token is its own, its stop token
    included) and pending [B]: the row's last token is not in the cache (it was sampled last;
    a next turn's prefill leads with it). Whether all rows have stopped is read every
    DONE_CHECK_EVERY tokens; the steps after that (holes only) are dropped at the end."""
    B, dev = logits.shape[0], logits.device
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    every = DONE_CHECK_EVERY.get(dev.type, DONE_CHECK_EVERY["cuda"])
    toks, logps, live = [], [], []
    for t in range(sampling.max_new_tokens):
        tok, lp = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        was = done
        tok = torch.where(was, pad_id, tok)
        toks.append(tok), logps.append(lp), live.append(~was)
        done = was | torch.isin(tok, stops)
        if t == sampling.max_new_tokens - 1 or ((t + 1) % every == 0 and bool(done.all())):
            break
        logits = decode_one_token(model, cache, tok, ~was)
    live = torch.stack(live, 1)
    n = len(toks) if every == 1 else int(live.any(0).sum())  # the steps where some row was still live
    return torch.stack(toks[:n], 1), torch.stack(logps[:n], 1) * live[:, :n], live[:, :n], ~was


# ----------------------------------------------------------------------------- single-turn

@torch.no_grad()
def generate_ids(model, input_ids, attention_mask, sampling: Sampling, stop_ids=(), pad_id=0, generator=None,
                 group=1):
    """Batched sampling after left-padded prompts input_ids [B, P] (attention_mask 1 real, 0 pad).
    Returns tokens [B, P + N] (prompt, then completion; pad_id after a row's stop token), the
    completion mask [B, N] (1 up to and including the first stop token) and its log-probs [B, N].
    N <= max_new_tokens: decoding stops once every row has. group > 1: rows in runs of `group`
    identical prompts are prefilled once per run."""
    B, P = input_ids.shape
    cache = KVCache(model.cfg, B, P + sampling.max_new_tokens, cache_dtype(model, input_ids.device), input_ids.device)
    real = attention_mask.long()
    if group > 1 and in_runs(input_ids, group) and in_runs(real, group):
        logits = prefill_groups(model, cache, input_ids, real, group)
    else:
        logits = prefill(model, cache, input_ids, real)
    toks, logps, live, _ = decode_n_tokens(model, cache, logits, sampling, stop_ids, pad_id, generator)
    return torch.cat([input_ids, toks], 1), live.long(), logps


def in_runs(rows, G) -> bool:
    """Whether rows [N, ...] come in runs of G identical rows (GRPO's groups of one prompt)."""
    return rows.shape[0] % G == 0 and bool((rows.view(-1, G, *rows.shape[1:]) == rows[::G, None]).all())


# ----------------------------------------------------------------------------- multi-turn

class Episodes(NamedTuple):
    seqs: list       # per episode: every token id (prompt, turns, glue)
    mask: list       # 1 on the model's sampled tokens
    logps: list      # the sampling log-prob of each token (0 on the others)
    prompt_len: list  # tokens before the first turn
    messages: list   # the whole conversation
    answers: list    # the last turn's text
    answered: list   # the episode ended with an answer (not cut, not over the tool, turn or position limit)
    turns: list
    envs: list


@torch.no_grad()
def run_episodes(model, tok, records, make_env, sampling: Sampling, max_turns, generator=None, device="cpu"):
    """One episode per record (agent.py's protocol), batched: every live episode samples its turn
    together (decode_n_tokens; the ones that stopped write holes until all have); each environment
    answers; the live ones prefill their glue (right-aligned, holes before it) after their cached
    tokens and sample again. Finished episodes leave the batch."""
    envs = [make_env() for _ in records]
    convs = [env.reset(r) for env, r in zip(envs, records)]
    seqs = [agent.render(c, tok, True) for c in convs]
    n = len(records)
    mask, logps = [[0] * len(s) for s in seqs], [[0.0] * len(s) for s in seqs]
    prompt_len, turns, answered, answers = [len(s) for s in seqs], [0] * n, [False] * n, [""] * n
    positions = model.cfg.max_position_embeddings  # an episode ends before it
    P = max(prompt_len)
    cache = KVCache(model.cfg, n, P + (sampling.max_new_tokens + 64) * max_turns, cache_dtype(model, device), device)
    ids, real = _right_aligned(seqs, tok.pad_id, device)
    logits = prefill(model, cache, ids, real)
    live = list(range(n))  # episode index of each batch row
    while live:
        toks, lps, alive, pending = decode_n_tokens(model, cache, logits, sampling, tok.stop_ids, tok.pad_id, generator)
        toks, lps, alive, pending = toks.tolist(), lps.tolist(), alive.tolist(), pending.tolist()  # one wait per turn
        glues, keep = [], []
        for r, e in enumerate(live):  # ---- the environment's answer to each turn
            ids_ = [t for t, a in zip(toks[r], alive[r]) if a]
            seqs[e] += ids_
            mask[e] += [1] * len(ids_)
            logps[e] += [p for p, a in zip(lps[r], alive[r]) if a]
            turns[e] += 1
            stopped = bool(ids_) and ids_[-1] in tok.stop_ids
            text = tok.tokenizer.decode(ids_, skip_special_tokens=True)
            answers[e] = text
            if not stopped:  # cut at --max-new-tokens: no answer
                convs[e].append({"role": "assistant", "content": text})
                continue
            new, over = envs[e].step(text)
            answered[e] = over and getattr(envs[e], "answered", True)
            g = [] if over else agent.glue(convs[e], text, new, ids_[-1], tok)
            convs[e] += [{"role": "assistant", "content": text}] + new
            if over or turns[e] >= max_turns or len(seqs[e]) + len(g) + sampling.max_new_tokens > positions:
                continue
            glues.append((ids_[-1:] if pending[r] else []) + g)  # a last sampled token is not in the cache yet
            seqs[e] += g
            mask[e] += [0] * len(g)
            logps[e] += [0.0] * len(g)
            keep.append(r)
        live = [live[r] for r in keep]
        if not live:
            break
        cache.keep(torch.tensor(keep, device=device))
        ids, real = _right_aligned(glues, tok.pad_id, device)
        logits = prefill(model, cache, ids, real)
    return Episodes(seqs, mask, logps, prompt_len, convs, answers, answered, turns, envs)


def _right_aligned(rows, pad_id, device):
    """Lists of ids -> ids [B, T] and real [B, T], each row's ids at its end (holes before them)."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], device=device)
    real = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, real


def episode_samples(ep: Episodes, pad_id, device) -> Samples:
    """Episodes as Samples: prompts left-padded to one length P, the rest (turns and glue)
    right-padded; mask = 1 on sampled tokens only, so the policy loss, the KL and the value loss
    see the model's tokens and nothing else; logps the sampling log-probs."""
    P = max(ep.prompt_len)
    L = max(len(s) - p for s, p in zip(ep.seqs, ep.prompt_len))
    seqs = torch.full((len(ep.seqs), P + L), pad_id, dtype=torch.long, device="cpu")
    attn = torch.zeros_like(seqs)
    mask, logps = (torch.zeros(len(ep.seqs), L, device="cpu") for _ in "ml")
    for i, (s, m, lp, p) in enumerate(zip(ep.seqs, ep.mask, ep.logps, ep.prompt_len)):
        seqs[i, P - p:P - p + len(s)] = torch.tensor(s, device="cpu")
        attn[i, P - p:P - p + len(s)] = 1
        mask[i, :len(s) - p] = torch.tensor(m[p:], dtype=torch.float, device="cpu")
        logps[i, :len(s) - p] = torch.tensor(lp[p:], device="cpu")
    return Samples(seqs.to(device), attn.to(device), mask.to(device), P, list(ep.answers),
                   torch.tensor(ep.answered, device=device), episodes=ep, logps=logps.to(device))


# ----------------------------------------------------------------------------- the engine

class Engine:
    """nanotrl's own engine: the trainer's model samples as it is, in eval mode, under the run's
    autocast (the mode it had is restored after)."""

    def __init__(self, model, tok, dist):
        self.model, self.tok, self.dist = model, tok, dist

    def load_weights(self, state=None):
        """Nothing to do: the engine reads the trainer's own parameters."""

    def generate(self, prompts, sampling: Sampling, generator=None, group=1) -> Samples:
        """Completions to `prompts` (lists of token ids), batched."""
        ids, pmask = batching.collate_prompts(prompts, self.tok.pad_id)
        ids, pmask = ids.to(self.dist.device), pmask.to(self.dist.device)
        group = group if group > 1 and in_runs(ids, group) and in_runs(pmask, group) else 1
        with self._sampling():
            seqs, cmask, logps = generate_ids(self.model, ids, pmask, sampling, self.tok.stop_ids, self.tok.pad_id,
                                              generator, group)
        P = ids.shape[1]
        rows, keep = seqs[:, P:].tolist(), cmask.tolist()
        completions = [[t for t, k in zip(r, m) if k] for r, m in zip(rows, keep)]
        texts = [self.tok.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        stops = set(self.tok.stop_ids)
        ended = torch.tensor([bool(stops.intersection(c)) for c in completions], device=self.dist.device)
        return Samples(seqs, torch.cat([pmask, cmask], 1), cmask.float(), P, texts, ended, logps=logps.float(),
                       group=group)

    def episodes(self, records, make_env, sampling: Sampling, max_turns, generator=None) -> Samples:
        """Multi-turn episodes, one per record (agent.py's environments and glue)."""
        with self._sampling():
            ep = run_episodes(self.model, self.tok, records, make_env, sampling, max_turns, generator,
                              self.dist.device)
        return episode_samples(ep, self.tok.pad_id, self.dist.device)

    @contextmanager
    def _sampling(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with common.autocast(self.dist):
                yield
        finally:
            self.model.train(was_training)


def eval_accuracy(engine: Engine, records, is_correct, max_new_tokens, batch_size=64):
    """Exact-match accuracy of greedy answers to `records` ({"prompt", "answer"}), split over ranks."""
    dist = engine.dist
    mine, correct = records[dist.rank::dist.world], 0
    with common.unsharded(engine.model):
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            out = engine.generate([chat.tokenize_prompt(r, engine.tok, 10**9) for r in chunk],
                                  Sampling(max_new_tokens, temperature=0))
            correct += sum(bool(is_correct(text, r["answer"])) for r, text in zip(chunk, out.texts))
    return collectives.all_sum(correct, dist) / max(len(records), 1)
