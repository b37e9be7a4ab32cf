"""model.py against transformers (the oracle) on tiny random checkpoints of every supported family.

Tolerance: 1e-4 absolute on fp32 logits. Both implementations run the same fp32 math in a different
order (fused SDPA vs eager softmax, fused qkv for GPT-2), which moves logits by ~1e-6; a wrong
RoPE, norm, bias or transpose moves them by >1e-2.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import engine
import hf_io
import model as M

transformers = pytest.importorskip("transformers")

V = 97


def hf_tiny(family, **over):
    """A tiny random transformers model of `family` (a CausalLM)."""
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, rms_norm_eps=1e-5, **over)
    elif family == "llama3":
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}, **over)
    elif family == "llama_bias":
        cfg = transformers.LlamaConfig(**common, attention_bias=True, mlp_bias=True, **over)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None, **over)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, **over)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, **over)  # head_dim != hidden/heads
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, pad_token_id=0, **over)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms; randomise them so a mix-up shows
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


FAMILIES = ["llama", "llama3", "llama_bias", "mistral", "qwen2", "qwen3", "gpt2"]


def batch(B=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = hf_tiny(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, str(d)


def test_logits_match_transformers(pair):
    family, hf, d = pair
    ours = hf_io.from_pretrained(d)
    ids, mask, pos = batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, mask, pos)
        got_nomask = ours(ids[:1])
        ref_nomask = hf(ids[:1]).logits
    real = mask.bool()
    assert (got - ref)[real].abs().max() < 1e-4
    assert (got_nomask - ref_nomask).abs().max() < 1e-4
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors


def test_transformers_loads_what_we_save(pair, tmp_path):
    family, hf, d = pair
    ours = hf_io.from_pretrained(d)
    with torch.no_grad():  # perturb so we know the saved weights are ours, not a copy of the files
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = hf_io.save_pretrained(ours, tmp_path / "saved", max_shard_bytes=40_000)  # forces several shards
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, pos = batch()
    with torch.no_grad():
        a, b = ours(ids, mask, pos), reloaded(ids, attention_mask=mask, position_ids=pos).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-4
    again = hf_io.from_pretrained(out)
    for (k, p), (k2, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(p, q), k


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_score_head_matches_sequence_classification(family, tmp_path):
    hf = hf_tiny(family)
    hf.save_pretrained(tmp_path / "lm")
    rm = hf_io.from_pretrained(tmp_path / "lm", head="score", seed=3)  # fresh score head on a causal LM
    assert rm.score.weight.abs().sum() > 0
    hf_io.save_pretrained(rm, tmp_path / "rm")
    cfg = json.load(open(tmp_path / "rm" / "config.json"))
    assert cfg["architectures"][0].endswith("ForSequenceClassification") and cfg["num_labels"] == 1
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    # right padding with pad id 0: HF scores the last non-pad token
    ids = torch.randint(1, V, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 6:] = 0
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = hf_rm(ids, attention_mask=mask).logits[:, 0]
        scores = rm(ids, mask)
    last = mask.sum(-1) - 1
    got = scores[torch.arange(3), last]
    assert (got - ref).abs().max() < 1e-4
    assert ref.std() > 1e-3
    back = hf_io.from_pretrained(tmp_path / "rm", head="score")
    assert torch.equal(back.score.weight, rm.score.weight)


def test_kv_cache_decode_equals_full_forward(pair):
    family, hf, d = pair
    ours = hf_io.from_pretrained(d)
    ids, mask, pos = batch(T=12)
    with torch.no_grad():
        full = ours(ids, mask, pos)
        cfg = ours.cfg
        cache = [(torch.zeros(3, cfg.num_kv_heads, 12, cfg.head_dim), torch.zeros(3, cfg.num_kv_heads, 12, cfg.head_dim))
                 for _ in range(cfg.num_layers)]
        P = 5
        step = [ours(ids[:, :P], mask[:, :P], pos[:, :P], kv_cache=cache, pos=0)]
        for t in range(P, 12):
            step.append(ours(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], kv_cache=cache, pos=t))
    inc = torch.cat(step, 1)
    assert (inc - full)[mask.bool()].abs().max() < 1e-5


def test_prefill_skipping_padding_equals_padded(pair):
    """generate's prefill runs the layers on the real positions only (`skip_padding`): the same
    logits there and the same KV cache entries as the padded forward, whose padding keys are masked."""
    family, hf, d = pair
    ours = hf_io.from_pretrained(d)
    cfg, (ids, mask, _) = ours.cfg, batch()
    caches = [[tuple(torch.zeros(3, cfg.num_kv_heads, 11, cfg.head_dim) for _ in "kv") for _ in range(cfg.num_layers)]
              for _ in range(2)]
    with torch.no_grad():
        padded = ours(ids, mask, kv_cache=caches[0], pos=0)
        skipped = ours(ids, mask, kv_cache=caches[1], pos=0, skip_padding=True)
    real = mask.bool()
    assert (skipped - padded)[real].abs().max() < 1e-5
    keys = real[:, None, :, None]
    for (k0, v0), (k1, v1) in zip(*caches):
        assert ((k1 - k0) * keys).abs().max() < 1e-5 and ((v1 - v0) * keys).abs().max() < 1e-5
        assert (k1 * ~keys).abs().max() == 0  # padding was never computed


def test_left_padding_does_not_change_outputs(pair):
    family, hf, d = pair
    ours = hf_io.from_pretrained(d)
    ids, mask, pos = batch()
    with torch.no_grad():
        padded = ours(ids, mask)  # position_ids derived from the mask
        for b in range(3):
            n = int(mask[b].sum())
            alone = ours(ids[b:b + 1, -n:])
            assert (padded[b, -n:] - alone[0]).abs().max() < 1e-5


def test_packed_documents_do_not_attend_to_each_other():
    cfg = M.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
    m = M.Transformer(cfg)
    m.init_weights(seed=0)
    a, b = torch.randint(1, V, (1, 5)), torch.randint(1, V, (1, 7))
    row = torch.cat([a, b], 1)
    docs = torch.tensor([[1] * 5 + [2] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        packed = m(row, docs, pos)
        assert (packed[:, :5] - m(a)).abs().max() < 1e-5
        assert (packed[:, 5:] - m(b)).abs().max() < 1e-5
        # the same row as ONE document differs: the mask, not luck, separated them
        assert (m(row)[:, 5:] - m(b)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_generate_matches_transformers(family, tmp_path):
    hf = hf_tiny(family)
    hf.save_pretrained(tmp_path)
    ours = hf_io.from_pretrained(tmp_path)
    ids, mask, _ = batch(T=6)
    eos = 5
    toks, cmask, _ = engine.generate_ids(ours, ids, mask, engine.Sampling(10, temperature=0), [eos], 0)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)
    N = toks.shape[1]
    assert torch.equal(toks, ref[:, :N])
    # the completion mask covers each sequence up to and including its first eos
    for b in range(3):
        comp = toks[b, 6:].tolist()
        n = comp.index(eos) + 1 if eos in comp else len(comp)
        assert cmask[b].tolist() == [1] * n + [0] * (N - 6 - n)


def test_generate_left_padding_invariant():
    cfg = M.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
    m = M.Transformer(cfg)
    m.init_weights(std=0.2, seed=0)
    ids, mask, _ = batch(T=7)
    toks, cm, _ = engine.generate_ids(m, ids, mask, engine.Sampling(8, temperature=0))
    for b in range(3):
        n = int(mask[b].sum())
        alone, _, _ = engine.generate_ids(m, ids[b:b + 1, -n:], torch.ones(1, n, dtype=torch.long), engine.Sampling(8, 0))
        assert torch.equal(alone[0, n:], toks[b, 7:])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(engine.sample(logits, 1.0, top_k=2, generator=g)[0].tolist()) == {2, 3}
    # probs ~ [.03, .09, .24, .64]: top_p 0.7 keeps {3, 2}; top_p 0.5 keeps only {3}
    assert set(engine.sample(logits, 1.0, top_p=0.7, generator=g)[0].tolist()) == {2, 3}
    assert set(engine.sample(logits, 1.0, top_p=0.5, generator=g)[0].tolist()) == {3}
    freq = (engine.sample(logits, 1.0, generator=g)[0] == 3).float().mean()
    assert abs(freq - torch.softmax(logits[0], -1)[3]) < 0.04


def test_bad_checkpoints_give_clear_errors(tmp_path):
    hf = hf_tiny("llama")
    hf.save_pretrained(tmp_path / "ok")
    cfg = json.load(open(tmp_path / "ok" / "config.json"))
    bad = dict(cfg, model_type="falcon")
    with pytest.raises(ValueError, match="falcon"):
        M.ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="yarn"):
        M.ModelConfig.from_hf(dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))
    # a checkpoint whose shapes disagree with its config lists the offending tensors
    (tmp_path / "wrong").mkdir()
    for f in os.listdir(tmp_path / "ok"):
        os.link(tmp_path / "ok" / f, tmp_path / "wrong" / f) if f != "config.json" else None
    json.dump(dict(cfg, intermediate_size=80), open(tmp_path / "wrong" / "config.json", "w"))
    with pytest.raises(ValueError, match="mlp.up_proj.weight"):
        hf_io.from_pretrained(tmp_path / "wrong")


def test_atomic_save_keeps_old_checkpoint_on_failure(tmp_path):
    cfg = M.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=4, head_dim=8, hf={"model_type": "llama"})
    m = M.Transformer(cfg)
    m.init_weights(seed=0)
    out = hf_io.save_pretrained(m, tmp_path / "ck")
    before = sorted(os.listdir(out))
    with pytest.raises(Exception):
        hf_io.save_pretrained(m, tmp_path / "ck", state_dict={"model.norm.weight": object()})
    assert sorted(os.listdir(out)) == before
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_meta_device_build():
    cfg = M.ModelConfig()
    with torch.device("meta"):
        m = M.Transformer(cfg)
    assert all(p.is_meta for p in m.parameters())


def test_read_tensor_slices_dtypes_and_shard_rows(tmp_path, monkeypatch):
    """Checkpoint tensors read in row slices (here 2 rows each) equal the stored ones, floating
    ones converted; with shard=(rank, world) exactly FSDP2's rows (torch.chunk's) are written."""
    from safetensors.torch import save_file

    w = torch.randn(7, 5).to(torch.bfloat16)
    save_file({"w": w, "ids": torch.arange(6), "n": torch.ones(3, dtype=torch.float16)}, tmp_path / "m.safetensors")
    f = str(tmp_path / "m.safetensors")
    monkeypatch.setattr(hf_io, "READ_BYTES", 2 * 5 * 2)
    got = hf_io.read_tensor(f, "w", dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, w.float())
    assert torch.equal(hf_io.read_tensor(f, "w"), w)
    ids = hf_io.read_tensor(f, "ids", dtype=torch.float32)  # integers keep their dtype
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(6))
    assert hf_io.read_tensor(f, "n", dtype=torch.float32).dtype == torch.float32
    for world in (2, 3, 8):
        for rank, rows in enumerate(torch.chunk(torch.arange(7), world)):
            t = hf_io.read_tensor(f, "w", dtype=torch.float32, shard=(rank, world))
            assert torch.equal(t[rows], w.float()[rows])  # the rest is left as allocated
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
        hf_io.read_tensor(str(tmp_path / "bad.safetensors"), "w")


@pytest.mark.parametrize("T,S", [(1, 9), (3, 9), (7, 7)])
def test_every_attention_path_computes_the_same_attention(T, S):
    """model.attend's CUDA paths for a mask with GQA (query groups folded into the query axis;
    K/V expanded) against SDPA's own enable_gqa, on the CPU, values and gradients (fp64)."""
    g = torch.Generator().manual_seed(0)
    B, H, KV, hd = 2, 6, 2, 8
    q = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, KV, S, hd, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, KV, S, hd, generator=g, dtype=torch.float64, requires_grad=True)
    mask = M.attention_bias(torch.tensor([[0, 0] + [1] * (S - 2), [1] * (S - 4) + [2] * 4]), T)
    out = {}
    for path in ("native", "fold", "expand"):
        y = M.attend(q, k, v, mask, path)
        grads = torch.autograd.grad((y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin()).sum(), (q, k, v))
        out[path] = (y, grads)
    for path in ("fold", "expand"):
        assert torch.allclose(out[path][0], out["native"][0], atol=1e-12)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(out[path][1], out["native"][1]))
    # a head that read the wrong KV head would differ: repeat (not interleave) the KV heads to see it
    wrong = F.scaled_dot_product_attention(q, k.repeat(1, H // KV, 1, 1), v.repeat(1, H // KV, 1, 1), attn_mask=mask)
    assert not torch.allclose(wrong, out["native"][0])


def test_attention_paths_on_cuda_are_fold_for_decode_and_expand_for_longer_calls():
    q = torch.empty(1, 4, 1, 8, device="meta")
    assert M.gqa_masked_path(q, 1) == "native"  # not CUDA: the CPU kernels take a mask with GQA
    cuda_q = type("Q", (), {"device": torch.device("cuda", 0)})()
    assert M.gqa_masked_path(cuda_q, 1) == "fold" and M.gqa_masked_path(cuda_q, M.FOLD_MAX_T) == "fold"
    assert M.gqa_masked_path(cuda_q, M.FOLD_MAX_T + 1) == "expand"
