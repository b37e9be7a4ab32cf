"""
Hugging Face checkpoint directories, read and written: config.json to a ModelConfig, safetensors
files read a tensor (or a row slice) at a time and memory-mapped where possible, models loaded one
block at a time (`load_parts`, for streamed quantizing and sharding), and saved atomically (a temp
directory, then a rename) with the file modes a plain mkdir would give.

GPT-2 is the one family whose names differ from ours (`_gpt2_to_ours`, `_ours_to_gpt2`); every
other family's checkpoint keys are model.py's module names as they are.
"""
import functools
import json
import math
import mmap
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import FAMILIES, ModelConfig, Transformer

def _gpt2_to_ours(sd, D):
    """GPT-2 names -> ours. Conv1D weights are stored [in, out] and must be transposed."""
    out = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers, not weights
            continue
        p = name.split(".")
        if p[0] in ("wte", "wpe", "ln_f"):
            out[{"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm"}[p[0]] + "." + p[-1]] = t
        elif p[0] == "h":
            pre, mod, kind = f"model.layers.{p[1]}.", ".".join(p[2:-1]), p[-1]
            tt = t.t() if kind == "weight" and t.dim() == 2 else t
            if mod == "attn.c_attn":
                for n, part in zip("qkv", tt.split(D, dim=0)):
                    out[f"{pre}self_attn.{n}_proj.{kind}"] = part
            else:
                ours = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                        "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}[mod]
                out[f"{pre}{ours}.{kind}"] = tt
        else:
            out[name] = t  # lm_head.weight, score.weight
    return out


def _ours_to_gpt2(sd):
    out, qkv = {}, {}
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
             "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
    for name, t in sd.items():
        p = name.split(".")
        if name.startswith("model.layers."):
            i, mod, kind = p[2], ".".join(p[3:-1]), p[-1]
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[mod[10]] = t
                continue
            out[f"transformer.h.{i}.{names[mod]}.{kind}"] = t.t().contiguous() if kind == "weight" and t.dim() == 2 else t
        elif name.startswith("model."):
            top = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"}[p[1]]
            out[f"transformer.{top}.{p[-1]}"] = t
        else:
            out[name] = t
    for (i, kind), d in qkv.items():
        t = torch.cat([d["q"], d["k"], d["v"]], dim=0)
        out[f"transformer.h.{i}.attn.c_attn.{kind}"] = t.t().contiguous() if kind == "weight" else t
    return out


def read_config(path) -> ModelConfig:
    where = os.path.join(path, "config.json")
    if not os.path.isfile(where):
        raise FileNotFoundError(f"{where}: not found; expected a Hugging Face model directory (config.json, "
                                "model.safetensors, tokenizer.json), e.g. from huggingface-cli download")
    try:
        with open(where, encoding="utf-8") as f:
            return ModelConfig.from_hf(json.load(f), where)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); download it again") from None
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None


def checkpoint_index(path) -> dict:
    """{tensor name in the files: file path} of an HF checkpoint directory (single file or sharded).
    Only headers are read."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    except SafetensorError as e:
        raise unreadable(single, e) from None


def unreadable(path, e):
    return ValueError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt: download or save it again")


def _layer_of(name: str):
    """Block number of a checkpoint tensor name (ours, HF Llama-style or GPT-2's), None outside blocks."""
    p = name.removeprefix("transformer.").split(".")
    if p[0] == "h":
        return int(p[1])
    if p[:2] == ["model", "layers"]:
        return int(p[2])
    return None


READ_BYTES = 1 << 26  # a tensor is read in slices of about this many file bytes
EMBEDDINGS = ("model.embed_tokens.weight", "wte.weight")  # the token embedding's names in HF files


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@functools.lru_cache(maxsize=64)
def _header(file, size, mtime_ns):
    """{name: (torch dtype, shape, first byte in the file)} of a safetensors file, after safe_open
    has checked the header against the file (keyed by size and mtime: a rewritten file is re-read)."""
    with safe_open(file, "pt"):
        pass
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (SAFETENSORS_DTYPES.get(v["dtype"]), v["shape"], 8 + n + v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def _mapped_tensor(file, name, dtype):
    """The tensor as a private (copy-on-write) memory map of its own bytes in the file, or None
    when it must be copied (a dtype conversion, an odd dtype, a misaligned or empty tensor). Like
    transformers' loader, nothing is read until it is used, and the pages are the result itself:
    clean file pages the kernel can drop, no copy besides them; writes (training) copy only the
    pages written. The map is released with the tensor (a quantized layer's fp32 weight with it)."""
    st = os.stat(file)
    header = _header(file, st.st_size, st.st_mtime_ns)
    if name not in header:  # the sliced read below names the file in its error
        return None
    dt, shape, start = header[name]
    if dt is None or (dtype is not None and dt.is_floating_point and dt != dtype) or start % dt.itemsize:
        return None
    numel = math.prod(shape)
    if numel == 0:
        return None
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with open(file, "rb") as f:
        buf = mmap.mmap(f.fileno(), start - base + numel * dt.itemsize, offset=base, access=mmap.ACCESS_COPY)
    return torch.frombuffer(buf, dtype=dt, count=numel, offset=start - base).view(shape)


def read_tensor(file, name, device="cpu", dtype=None, shard=None):
    """One checkpoint tensor, floating point ones in `dtype` (default: the file's). A whole tensor
    on the CPU in the file's dtype is memory-mapped (_mapped_tensor). Otherwise it is read in row
    slices of about READ_BYTES, each through its own safe_open, so that neither the whole tensor in
    the file's dtype nor the file's mapped pages (which count in a process's RSS while mapped) are
    ever in memory besides the result. shard=(rank, world): only the rows of FSDP2's dim-0 shard
    `rank` (as torch.chunk) are read and written; on the CPU the other rows' pages are never
    touched, so they take no memory until fully_shard keeps the shard and frees the rest."""
    try:
        if shard is None and torch.device(device).type == "cpu":
            mapped = _mapped_tensor(file, name, dtype)
            if mapped is not None:
                return mapped
        with safe_open(file, "pt") as f:
            sl = f.get_slice(name)
            shape, first = sl.get_shape(), sl[:1]
            if len(shape) < 2:
                first = f.get_tensor(name)
        dtype = dtype if dtype is not None and first.is_floating_point() else first.dtype
        if len(shape) < 2:
            return first.to(device=device, dtype=dtype)
        out = torch.empty(shape, dtype=dtype, device=device)
        start, stop = 0, shape[0]
        if shard is not None:
            size = -(-shape[0] // shard[1])
            start, stop = min(shape[0], shard[0] * size), min(shape[0], (shard[0] + 1) * size)
        step = max(1, READ_BYTES // max(1, first.numel() * first.element_size()))
        for i in range(start, stop, step):
            with safe_open(file, "pt") as f:
                out[i:min(stop, i + step)] = f.get_slice(name)[i:min(stop, i + step)]
        return out
    except SafetensorError as e:
        raise unreadable(file, e) from None


def read_tensors(index: dict, names, cfg: ModelConfig, device="cpu", dtype=None, shard=None) -> dict:
    """The checkpoint tensors `names` (file names), under our names (read_tensor: only those bytes
    come off the disk; `shard`: only those rows)."""
    sd = {n: read_tensor(index[n], n, device, dtype, shard) for n in names}
    return _gpt2_to_ours(sd, cfg.hidden_size) if cfg.gpt2 else sd


def load_parts(path, head="lm", dtype=torch.float32, device="cpu", seed=0, shard=None, frozen_embedding=False,
               keep_layers=0):
    """Load an HF directory one block at a time: the model is built on the meta device, then each
    block (and last the rest: embeddings, final norm, head) is read from the safetensors files
    (only its own tensors) and assigned in place. Yields (model, part) after each part is filled,
    so that a caller can quantize or shard it before the next one is read; the model holds the
    checkpoint's weights once the generator is exhausted. head="score" on a causal-LM checkpoint
    starts a fresh score head (reward and value models begin this way). shard=(rank, world): the
    root's matrices (embeddings, head) hold only this rank's FSDP2 rows (see read_tensor), for a
    caller that shards the root before touching them. frozen_embedding: the token embedding, when
    it is not also the LM head, stays in the checkpoint's dtype where that is narrower (a bf16
    file: half the memory, and the same values, upcast row by row in forward). keep_layers > 0:
    only the first N blocks are built and read (the saved config then says N layers)."""
    cfg = read_config(path)
    if keep_layers:
        if not 0 < keep_layers <= cfg.num_layers:
            raise ValueError(f"{path}: keeping {keep_layers} layers of a model that has {cfg.num_layers}")
        cfg.num_layers = keep_layers
        cfg.hf = dict(cfg.hf, **{"n_layer" if cfg.gpt2 else "num_hidden_layers": keep_layers})
    with torch.device("meta"):
        model = Transformer(cfg, head)
    index = checkpoint_index(path)
    names = {}
    for n in index:
        if not n.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's old causal-mask buffers
            names.setdefault(_layer_of(n), []).append(n)
    for i, part in [*enumerate(model.model.layers), (None, model)]:
        own = names.get(i, [])
        narrow = [n for n in own if frozen_embedding and n.removeprefix("transformer.") in EMBEDDINGS
                  and not (head == "lm" and cfg.tie_word_embeddings)]
        sd = read_tensors(index, [n for n in own if n not in narrow], cfg, device, dtype, shard if part is model else None)
        for k, v in read_tensors(index, narrow, cfg, device, None, shard).items():
            sd[k] = v if v.element_size() < dtype.itemsize else v.to(dtype)
        prefix = "" if part is model else f"model.layers.{i}."
        expected = {k: v.shape for k, v in part.state_dict(prefix=prefix).items()
                    if part is not model or not k.startswith("model.layers.")}
        if part is model:
            if head == "score":
                sd.pop("lm_head.weight", None)
            if cfg.tie_word_embeddings and head == "lm":
                expected.pop("lm_head.weight")
                sd.pop("lm_head.weight", None)
        fresh_score = part is model and head == "score" and "score.weight" not in sd
        if fresh_score:
            expected.pop("score.weight")
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(s)}"
                  for k, s in expected.items() if k in sd and sd[k].shape != s]
        if missing or unexpected or shapes:
            raise ValueError(f"{path}: checkpoint does not match the {cfg.model_type} model:\n"
                             f"  missing: {missing}\n  unexpected: {unexpected}\n  shape mismatches: {shapes}")
        part.load_state_dict({k.removeprefix(prefix): v for k, v in sd.items()}, strict=False, assign=True)
        if fresh_score:
            model.score.weight = nn.Parameter(torch.empty(1, cfg.hidden_size, dtype=dtype, device=device))
            model.init_score(seed)
        if part is model:
            model.tie_weights()
        del sd  # the part holds its tensors; a caller that replaces them (quantizing) frees the old ones
        yield model, part


def from_pretrained(path, head="lm", dtype=torch.float32, device="cpu", seed=0) -> Transformer:
    """Load an HF directory (see `load_parts`; weights are materialised once). device="meta"
    returns the empty model."""
    if str(device) == "meta":
        with torch.device("meta"):
            return Transformer(read_config(path), head)
    for model, _ in load_parts(path, head, dtype, device, seed):
        pass
    return model


def hf_config(model: Transformer, dtype=None) -> dict:
    """config.json for `model`: the original dict with the head's architecture name."""
    cfg = model.cfg
    d = dict(cfg.hf)
    arch = FAMILIES[cfg.model_type] + ("LMHeadModel" if cfg.gpt2 else "ForCausalLM")
    d.pop("id2label", None), d.pop("label2id", None)
    if model.head == "score":
        arch = FAMILIES[cfg.model_type] + "ForSequenceClassification"
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    d["architectures"] = [arch]
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    if cfg.pad_token_id is not None:
        d["pad_token_id"] = cfg.pad_token_id
    if dtype is not None:
        d["torch_dtype" if "torch_dtype" in d else "dtype"] = str(dtype).removeprefix("torch.")
    return d


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def save_pretrained(model: Transformer, path, state_dict=None, tokenizer_dir=None, max_shard_bytes=5 * 2**30,
                    extra_files=None):
    """Write an HF directory atomically (temp dir, then rename). `state_dict` overrides the model's
    own: a dict, or an iterable of dicts written as they come (a model gathered one block at a time
    from FSDP shards: each shard file is written once full, so the whole state dict never exists).
    `extra_files`: {name: text} written beside the weights (the model card)."""
    chunks = [state_dict or model.state_dict()] if state_dict is None or isinstance(state_dict, dict) else state_dict
    with atomic_dir(path) as tmp:
        files, cur, size, total, dtype = [], {}, 0, 0, None

        def flush():
            files.append((os.path.join(tmp, f"part-{len(files)}.safetensors"), list(cur)))
            save_file(cur, files[-1][0], metadata={"format": "pt"})
            cur.clear()

        for chunk in chunks:
            sd = {k: v.detach().cpu().contiguous() for k, v in chunk.items()}
            if model.head == "lm" and model.cfg.tie_word_embeddings:
                sd.pop("lm_head.weight", None)  # HF stores the tied matrix once, as the embedding
            if model.cfg.gpt2:
                sd = _ours_to_gpt2(sd)
            for k in sorted(sd):
                nbytes = sd[k].numel() * sd[k].element_size()
                if cur and size + nbytes > max_shard_bytes:
                    flush()
                    size = 0
                cur[k], size, total, dtype = sd[k], size + nbytes, total + nbytes, dtype or sd[k].dtype
        flush()
        if len(files) == 1:
            os.rename(files[0][0], os.path.join(tmp, "model.safetensors"))
        else:
            weight_map = {}
            for i, (fname, keys) in enumerate(files):
                final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                os.rename(fname, os.path.join(tmp, final))
                weight_map.update({k: final for k in keys})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model, dtype), f, indent=2)
        for fname in TOKENIZER_FILES if tokenizer_dir else ():
            if os.path.exists(os.path.join(tokenizer_dir, fname)):
                shutil.copy(os.path.join(tokenizer_dir, fname), os.path.join(tmp, fname))
        for fname, text in (extra_files or {}).items():  # e.g. the model card, README.md
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
    return os.path.abspath(path)


def _umask_modes(root):
    """The modes a plain mkdir and open would give (mkdtemp makes 0700; copied files keep their
    source's): a server running as another user can read a saved model when the umask lets it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666 & ~umask)


@contextmanager
def atomic_dir(path):
    """Yields a temp directory beside `path` to fill; on success it replaces `path` (the old one is
    removed only after the new one is in place), on error it is deleted: never a half-written dir."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
        _umask_modes(tmp)
        if os.path.exists(path):
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
