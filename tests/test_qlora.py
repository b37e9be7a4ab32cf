"""QLoRA: NF4 base + LoRA adapters; streamed loading and saving (common.load_model,
checkpoint.hf_state_chunks); the scripts with --quantize nf4 --lora-r 8."""
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import config
import lora
import hf_io
import model as M
import nf4
from helpers import run_script, tiny_model_dir
from test_lora import SFT, assert_same_runs


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("qlora") / "base"))


def reference_qlora(base, double_quant, dense):
    """The non-streamed path: whole model, quantized, adapters (B = 0.01); with dense=True each NF4
    layer is replaced by an nn.Linear holding its dequantized weight (plain LoRA on those)."""
    m = nf4.quantize_model(hf_io.from_pretrained(base), double_quant=double_quant)
    if dense:
        for name, mod in list(m.named_modules()):
            if isinstance(mod, nf4.NF4Linear):
                lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                lin.weight.data = mod.dequantize()
                parent, leaf = name.rsplit(".", 1)
                setattr(m.get_submodule(parent), leaf, lin)
    lora.apply_lora(m, r=4, alpha=8, seed=0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            layer.lora_B.weight.fill_(0.01)
    return m


def test_qlora_forward_backward_equals_lora_on_dequantized_weights(base):
    q, d = reference_qlora(base, True, dense=False), reference_qlora(base, True, dense=True)
    q.grad_checkpointing = True  # NF4's backward under recomputation too
    ids = torch.randint(1, 30, (3, 11), generator=torch.Generator().manual_seed(0))
    lq, ld = q(ids), M.Transformer.forward(d, ids)
    # the same fp32 weights and products; x @ W^T (ours) and F.linear may sum in another order: ~1e-7 relative
    torch.testing.assert_close(lq, ld, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(lq)
    lq.backward(g)
    ld.backward(g)
    gq = {n: p.grad for n, p in q.named_parameters() if p.grad is not None}
    gd = {n: p.grad for n, p in d.named_parameters() if p.grad is not None}
    assert gq.keys() == gd.keys() and all(".lora_A." in n or ".lora_B." in n for n in gq)
    assert len(gq) == 2 * 7 * q.cfg.num_layers  # every adapter of every projection, nothing else
    for n in gq:
        torch.testing.assert_close(gq[n], gd[n], rtol=1e-4, atol=1e-6)
    assert max(g.abs().max().item() for g in gq.values()) > 1e-3


@pytest.mark.slow
def test_streamed_load_and_save_two_processes(base, tmp_path):
    """Double quantization: every kind of NF4 tensor (codes, 8-bit absmax, their fp32 constants and
    a 1-element offset) goes through FSDP2's sharding and byte-wise all-gather."""
    double_quant = True
    run_script("tests/support/fsdp_stream.py", [base, tmp_path / "o2", "1"], tmp_path, nproc=2)
    r2 = json.load(open(tmp_path / "o2" / "result_2.json"))
    ids = torch.randint(1, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = hf_io.from_pretrained(base)
        want = plain(ids)
        ref = reference_qlora(base, double_quant, dense=False)
        want_q = ref(ids)
    # FSDP2 gathers the very tensors one process holds, and every rank runs the same fp32 math
    assert torch.equal(torch.tensor(r2["plain"]), want)
    assert torch.equal(torch.tensor(r2["qlora"]), want_q)
    # each rank holds half of each model (1-element tensors aside: FSDP2 pads them to 2)
    full = [sum(p.nbytes for p in m.parameters()) for m in (plain, ref)]
    assert r2["plain_bytes"] <= 0.51 * full[0] and r2["qlora_bytes"] <= 0.51 * full[1]
    assert full[1] < 0.5 * full[0]
    # the streamed save (2 processes, one block at a time) equals the whole merged model, tensor for tensor
    merged = lora.merge_(reference_qlora(base, double_quant, dense=True)).state_dict()
    for out in ("model", "sharded"):
        files = glob.glob(str(tmp_path / "o2" / out / "*.safetensors"))
        saved = {k: v for f in files for k, v in load_file(f).items()}
        assert saved.keys() == merged.keys()
        for k in merged:
            assert torch.equal(saved[k], merged[k]), k
    assert len(files) > 1 and os.path.exists(tmp_path / "o2" / "sharded" / "model.safetensors.index.json")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o2" / "sharded", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want_q, rtol=0, atol=1e-4)  # fused vs eager attention only


@pytest.mark.slow
def test_qlora_sft_one_vs_two_processes_and_resume(base, tmp_path):
    task = os.path.join(os.path.dirname(base), "task")
    QLORA = SFT + ["--quantize", "nf4", "--data", os.path.join(task, "train.jsonl"),
                   "--eval-data", os.path.join(task, "test.jsonl")]
    run_script("train_sft.py", QLORA + ["--model", base, "--out", "one"], tmp_path)
    run_script("train_sft.py", QLORA + ["--model", base, "--out", "two", "--batch-size", "4"], tmp_path, nproc=2)
    assert_same_runs(tmp_path / "one", tmp_path / "two", 1e-5, 1e-4)  # as test_lora.py: summation order only
    run_script("train_sft.py", QLORA + ["--model", base, "--out", "res", "--stop-after", "3"], tmp_path)
    run_script("train_sft.py", QLORA + ["--model", base, "--out", "res", "--resume"], tmp_path)
    assert_same_runs(tmp_path / "one", tmp_path / "res", 0.0, 0.0)  # resume repeats the same fp32 arithmetic


def test_bad_quantize_flags(capsys):
    for flags, message in [(dict(quantize="nf4"), "needs --lora-r"),
                           (dict(double_quant=True), "needs --quantize nf4"), (dict(cpu_offload=True), "needs a GPU")]:
        with pytest.raises(ValueError, match=message):
            common.setup(config.TrainConfig(**flags))
    # an unknown --quantize is refused by the flag parser (TrainConfig.CHOICES)
    with pytest.raises(SystemExit):
        config.parse_config(config.TrainConfig, ["--quantize", "int4", "--lora-r", "8"])
    assert "--quantize 'int4': expected one of '', 'nf4'" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_embedding_keeps_a_bf16_checkpoints_dtype(tmp_path, tied):
    """A frozen token embedding (QLoRA / LoRA base, a reference model) read from a bf16 file stays
    bf16: half its memory, and the same logits as the fp32 model (the values are the same, upcast
    in forward). Not when it is also the LM head (the head's matmul runs in fp32). The merged export
    is in one dtype."""
    m = hf_io.from_pretrained(tiny_model_dir(str(tmp_path / "fp32")))
    m.cfg.tie_word_embeddings = tied
    m.cfg.hf = dict(m.cfg.hf, tie_word_embeddings=tied)
    if not tied:
        m.lm_head.weight = torch.nn.Parameter(torch.randn(m.lm_head.weight.shape))
    path = hf_io.save_pretrained(m.to(torch.bfloat16), tmp_path / "bf16")
    want = hf_io.from_pretrained(path)  # fp32 throughout
    ids = torch.randint(1, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    cfg = config.TrainConfig(dtype="fp32", out=str(tmp_path / "o"), quantize="", lora_r=4)
    d = common.setup(cfg)
    for kw in ({"adapt": True}, {"train": False}):
        got = common.load_model(path, cfg, d, **kw)
        emb = got.model.embed_tokens.weight
        assert emb.dtype == (torch.float32 if tied else torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(got(ids), want(ids))
        assert all(v.dtype == torch.float32 for c in checkpoint.hf_state_chunks(got, d) for v in c.values())
    full = common.load_model(path, config.TrainConfig(dtype="fp32", out=str(tmp_path / "o")), d)  # trained: fp32
    assert full.model.embed_tokens.weight.dtype == torch.float32
