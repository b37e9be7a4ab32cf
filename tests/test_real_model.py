"""nanotrl on a real instruct model, SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings,
ChatML with a default system prompt), against the oracles: transformers for logits, greedy
generation and chat tokenization, PEFT for LoRA, bitsandbytes for NF4. The model comes from
../shared/models/smollm2-135m-instruct, converted once per machine (tests/support/real_model.py);
the tests skip without it.

Tolerance: fp32 on CPU, our logits and transformers' (SDPA attention, its default) are measured
identical, with and without LoRA: the same ops in the same order. ATOL = 2e-4 on logits of
magnitude up to ~40 leaves room for fp32 reassociation alone (transformers' eager attention
instead of SDPA moves these logits by 9.4e-5) and is 30x below the smallest real bug tried (RoPE
theta 0.1% off: 6e-3; RMSNorm eps 1e-6 for 1e-5: 3e-2). Tokens and NF4 bytes must be equal.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import lora
import engine
import hf_io
import nf4
import real_model
from data import chat

ATOL = 2e-4

# each test loads the 135M model (some two or four copies): not in the fast loop
pytestmark = pytest.mark.slow


def msg(role, content):
    return {"role": role, "content": content}


SYS = msg("system", "You answer in one word.")
U1, A1 = msg("user", "What is the capital of France?"), msg("assistant", "The capital of France is Paris.")
U2 = msg("user", "Tell me a joke about cats, please.")
A2 = msg("assistant", "Why did the cat sit on the computer? To keep an eye on the mouse!")
CONVS = {"no system": [U1, A1], "system": [SYS, msg("user", "Name a colour."), msg("assistant", "Blue.")],
         "multi-turn": [msg("user", "Hi"), msg("assistant", "Hello! How can I help?"), U2, A2],
         "multi-turn+system": [SYS, U1, A1, U2, A2]}
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def model_dir():
    try:
        return real_model.model_dir()
    except real_model.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(model_dir):
    return hf_io.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(model_dir):
    return chat.load_tokenizer(model_dir)


def pad(rows, pad_id, left):
    """ids [B, T] and attention mask [B, T] of token lists padded to the longest."""
    T = max(map(len, rows))
    fill = [[pad_id] * (T - len(r)) for r in rows]
    ids = [f + r if left else r + f for r, f in zip(rows, fill)]
    mask = [[0] * len(f) + [1] * len(r) if left else [1] * len(r) + [0] * len(f) for r, f in zip(rows, fill)]
    return torch.tensor(ids), torch.tensor(mask)


def conversations(tok, names=("no system", "system", "multi-turn")):
    """Three conversations of different lengths, rendered with the model's template and right-padded
    as a training batch; `learn` marks the assistant tokens (render_chat's mask)."""
    rendered = [chat.render_chat(CONVS[n], tok) for n in names]
    ids, mask = pad([r[0] for r in rendered], tok.pad_id, left=False)
    learn, _ = pad([r[1] for r in rendered], 0, left=False)
    return ids, mask, learn


def test_logits_match_transformers(ours, hf, tok):
    """Our fp32 logits vs transformers' on a padded batch of chat-rendered conversations (real
    positions), and the model is the trained one: its assistant tokens are likely."""
    ids, mask, learn = conversations(tok)
    with torch.no_grad():
        got, ref = ours(ids, mask), hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - ref)[real].abs().max() <= ATOL
    # both sides reading the same wrongly converted weights would agree: the answers' likelihood
    # shows the trained model (measured 1.49 nats per token; q/k rows left in llama.cpp's order: 4.2)
    nll = F.cross_entropy(ref[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
    assert nll[learn[:, 1:].bool()].mean() < 2.0


@pytest.mark.slow
def test_greedy_generation_matches_transformers(ours, hf, tok):
    """64 greedy tokens for three left-padded prompts of different lengths: our tokens and
    completion mask vs transformers' generate, each row through its first eos (after it both pad).
    Equal tokens are expected, not lucky: the smallest top-2 logit gap along these answers is 0.026
    (measured on transformers' scores), 100x ATOL."""
    poem = [msg("system", "You are a poet."), msg("user", "Write a short poem about the sea and the moon at night.")]
    prompts = [[U1], poem, "List three fruits."]  # a message list, with a system message, a plain string
    ids, mask = pad([chat.tokenize_prompt({"prompt": p}, tok, 10**6) for p in prompts], tok.pad_id, left=True)
    P = ids.shape[1]
    toks, cmask, _ = engine.generate_ids(ours, ids, mask, engine.Sampling(64, temperature=0), tok.stop_ids, tok.pad_id)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=tok.stop_ids,
                          pad_token_id=tok.pad_id)
    theirs = ref[:, P:]
    ends = [next((i + 1 for i, t in enumerate(row) if t in tok.stop_ids), len(row)) for row in theirs.tolist()]
    hmask = torch.tensor([[1] * n + [0] * (theirs.shape[1] - n) for n in ends])
    texts = [tok.tokenizer.decode(t[m.bool()].tolist()) for t, m in zip(toks[:, P:], cmask)]
    assert torch.equal(toks[:, :P], ids)
    assert cmask.shape == hmask.shape and torch.equal(cmask, hmask), texts
    assert torch.equal(toks[:, P:] * cmask, theirs * hmask), texts
    # the batch exercises both ends: a row stopped by eos and one cut at 64 tokens; and the answer is right
    assert min(ends) < 64 == max(ends)
    assert "Paris" in texts[0]


def test_chat_tokenization_matches_transformers(model_dir, tok):
    """data/chat.py's ids vs transformers' apply_chat_template, with and without the generation
    prompt and a system message (the template adds its default one): render_chat, tokenize_sft,
    tokenize_prompt and tokenize_preference."""
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)

    def want(msgs, gen):
        return hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True,
                                          return_dict=True)["input_ids"]

    for name, conv in CONVS.items():
        for msgs in (conv, conv[:-1]):
            for gen in (False, True):
                assert chat.render_chat(msgs, tok, gen)[0] == want(msgs, gen), (name, len(msgs), gen)
        text = hf_tok.decode(want(conv, False), skip_special_tokens=False)
        assert text.startswith(DEFAULT_SYSTEM) == (conv[0]["role"] != "system"), name
        # SFT learns each assistant turn through its <|im_end|>
        e = chat.tokenize_sft({"messages": conv}, tok, 10**6)
        assert e["input_ids"] == want(conv, False)
        learned = [i for i, m in zip(e["input_ids"], e["loss_mask"]) if m]
        turns = "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        assert hf_tok.decode(learned, skip_special_tokens=False) == turns
        # RL prompt and DPO pair: prompt = with the generation prompt; answer = what follows it, through <|im_end|>
        prompt = want(conv[:-1], True)
        assert chat.tokenize_prompt({"prompt": conv[:-1]}, tok, 10**6) == prompt
        pair = {"prompt": conv[:-1], "chosen": conv[-1]["content"], "rejected": "No."}
        p = chat.tokenize_preference(pair, tok, 10**6, 10**6)
        assert p["prompt_ids"] == prompt
        assert prompt + p["chosen_ids"] == want(conv, False)[:-1]  # all but the "\n" after <|im_end|>
        assert hf_tok.decode(p["rejected_ids"], skip_special_tokens=False) == "No.<|im_end|>"


def test_lora_forward_matches_peft(ours, hf, tok):
    """LoRA r=8, alpha=16 on every linear layer: our logits vs PEFT's with the same A and B
    (B nonzero, so the adapters move the logits)."""
    peft = pytest.importorskip("peft")
    mine = lora.apply_lora(copy.deepcopy(ours), r=8, alpha=16, targets="all-linear")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    g = torch.Generator().manual_seed(0)
    adapters = {n: p for n, p in mine.named_parameters() if ".lora_" in n}
    peft_params = dict(theirs.named_parameters())
    # PEFT's names: under base_model.model., with the adapter's name ("default") after lora_A/lora_B
    names = {n: "base_model.model." + n.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
             for n in adapters}
    assert len(adapters) == 30 * 7 * 2 and set(names.values()) == {n for n in peft_params if ".lora_" in n}
    with torch.no_grad():
        for n, p in adapters.items():
            if ".lora_B." in n:  # A keeps apply_lora's Kaiming init; B = 0 would make any adapter look right
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            peft_params[names[n]].copy_(p)
        ids, mask, _ = conversations(tok, ("no system", "system"))  # short rows: three forwards
        got, ref = mine(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits
        with lora.adapters_disabled(mine):
            off = mine(ids, mask)
    real = mask.bool()
    assert (got - ref)[real].abs().max() <= ATOL
    assert (got - off)[real].abs().max() > 1.0  # measured 4.3: the adapters matter


# first, middle and last blocks, every projection kind (QLoRA quantizes these, not the embedding)
NF4_WEIGHTS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
               "model.layers.0.self_attn.v_proj.weight", "model.layers.15.mlp.gate_proj.weight",
               "model.layers.15.mlp.up_proj.weight", "model.layers.29.self_attn.o_proj.weight",
               "model.layers.29.mlp.down_proj.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_real_weights_match_bitsandbytes(model_dir, dtype):
    """nf4.py vs bitsandbytes' quantize_4bit(quant_type="nf4", blocksize=64) on the model's own
    weights. Single quantization: packed bytes, absmax and dequantized weights equal. Double
    quantization: the 4-bit codes and the second level's constants equal; each 8-bit absmax code is
    ours the nearest level, bitsandbytes' C kernel (an approximate search) picks another one for
    0.01-0.5% of them, always as near within 1e-4 (measured <= 2.8e-5; up to 3 levels away near 0,
    where the levels are ~1e-6 apart, so not only neighbours as in tests/test_nf4.py); the weights
    of every block whose code agrees are equal."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        weights = {n: f.get_tensor(n).to(dtype) for n in NF4_WEIGHTS}
    for name, w in weights.items():
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        q = nf4.quantize(w)
        assert torch.equal(q["codes"], packed.flatten()), name
        assert torch.equal(q["absmax"], state.absmax), name
        deq = nf4.dequantize(w.shape, dtype, **q)
        assert deq.dtype == dtype and torch.equal(deq, bnbf.dequantize_4bit(packed, state)), name

        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        q = nf4.quantize(w, double_quant=True)
        assert torch.equal(q["codes"], packed.flatten()), name
        assert torch.equal(q["offset"], state.offset.reshape(1)), name
        assert torch.equal(q["absmax2"], state.state2.absmax), name
        same = q["qabsmax"] == state.absmax
        # each block's absmax, centred and scaled as the 8-bit codes encode it
        v = (nf4.quantize(w)["absmax"] - q["offset"]) / q["absmax2"].repeat_interleave(256)[:len(same)]
        dist = (v[:, None] - nf4.DYNAMIC[None]).abs()  # [blocks, 256]: to each level
        d_ours = dist.gather(1, q["qabsmax"].long()[:, None])[:, 0]
        d_bnb = dist.gather(1, state.absmax.long()[:, None])[:, 0]
        assert torch.equal(d_ours, dist.min(1).values), name
        assert (d_bnb - d_ours).max() < 1e-4 and (~same).float().mean() < 0.01, name
        rows = same.repeat_interleave(64).view(w.shape)
        assert torch.equal(nf4.dequantize(w.shape, dtype, **q)[rows], bnbf.dequantize_4bit(packed, state)[rows]), name
