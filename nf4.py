"""
4-bit NormalFloat (NF4) frozen weights for QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs"), in plain torch, bit-compatible with bitsandbytes' `quantize_4bit(quant_type="nf4")`.

A weight [out, in] is flattened and cut into blocks of 64; each block keeps its absmax (fp32) and
each value the index of the nearest of 16 NF4 levels, two indices per byte (first one in the high
nibble, as bitsandbytes packs them): 0.5 byte + 4/64 byte per parameter. Double quantization stores
the absmax constants themselves in 8 bits (bitsandbytes' signed dynamic map), in blocks of 256
after subtracting their mean: 0.5 + 1/64 + 4/(64*256) bytes per parameter.

The dense weight exists only inside one layer's forward or backward: `NF4Linear` dequantizes into
the input's dtype, and its autograd function recomputes it in backward instead of saving it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK, BLOCK2 = 64, 256
# the QLoRA paper's NF4 levels (bitsandbytes `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled
# to [-1, 1], with an exact 0
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], device="cpu")


PAIRS = torch.stack((NF4.repeat_interleave(16), NF4.repeat(16)), -1)  # [256, 2]: a byte's two levels


def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, Dettmers 2015): a sign, a
    run of zeros giving the decimal exponent 10^-6..10^0, then a linear fraction in (0.1, 1)."""
    data = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32, device="cpu")
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (i - 6)).tolist()
        data += means + [-m for m in means]
    return torch.tensor(sorted(data), dtype=torch.float32, device="cpu")


DYNAMIC = dynamic_map()


def _blockwise(x, code, block):
    """Nearest `code` index of each value of x (flat, numel divisible by block), scaled by its
    block's absmax, and the absmax [numel / block] (fp32). Same arithmetic as bitsandbytes: a
    multiply by the reciprocal, then midpoints between sorted levels."""
    xb = x.reshape(-1, block).float()
    absmax = xb.abs().amax(-1)
    scaled = torch.clamp(xb * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    mids = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled.reshape(-1), mids.to(x.device), out_int32=True).to(torch.uint8), absmax


def quantize(w, double_quant=False):
    """w [out, in] (any float dtype) -> dict of tensors: codes uint8 [numel / 2], and either absmax
    fp32 [numel / 64] or, with double quantization, qabsmax uint8 [numel / 64], absmax2 fp32
    [ceil(numel / 64 / 256)] and offset fp32 [1]."""
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs a weight whose size is a multiple of {BLOCK}, got {tuple(w.shape)}")
    q, absmax = _blockwise(w.detach(), NF4, BLOCK)
    out = {"codes": (q[0::2] << 4) | q[1::2]}
    if not double_quant:
        return {**out, "absmax": absmax}
    offset = absmax.mean()
    centered = absmax - offset
    # nearest level, as bitsandbytes' reference kernel (backends/default/ops.py) picks it; its C CPU
    # kernel's approximate search (BinSearch Direct2) picks the other neighbour for ~0.15% of values
    # lying within ~1e-3 of a midpoint (tests/test_nf4.py measures this)
    pad = -len(centered) % BLOCK2  # a short last block: zeros change neither its absmax nor its codes
    q2, absmax2 = _blockwise(F.pad(centered, (0, pad)), DYNAMIC, BLOCK2)
    return {**out, "qabsmax": q2[:len(centered)], "absmax2": absmax2, "offset": offset.reshape(1)}


_TABLES = {}


def _on(table, device):
    """A lookup table on `device`, copied there once (not at every dequantization)."""
    key = (id(table), torch.device(device))
    if key not in _TABLES:
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def dequantize(shape, dtype, codes, absmax=None, qabsmax=None, absmax2=None, offset=None):
    """The dense weight [shape] in `dtype`, computed in fp32 as bitsandbytes does."""
    if absmax is None:
        n = len(qabsmax)
        scale = _on(DYNAMIC, codes.device)[F.pad(qabsmax, (0, -n % BLOCK2)).long()].view(-1, BLOCK2) * absmax2[:, None]
        absmax = scale.reshape(-1)[:n] + offset
    # one lookup per byte into its two levels (high nibble first): an int32 index (2 bytes per
    # weight) besides the fp32 result, where int64 indices per nibble would take 8
    w = _on(PAIRS, codes.device).index_select(0, codes.int()).view(-1, BLOCK).mul_(absmax[:, None])
    return w.view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward: the dense weight is never saved
    (only the 4-bit codes, which the layer holds anyway). No gradient for W: it is frozen."""

    @staticmethod
    def forward(ctx, x, shape, *qt):
        ctx.shape = shape
        ctx.save_for_backward(*qt)
        return x @ dequantize(shape, x.dtype, *qt).t()

    @staticmethod
    def backward(ctx, g):
        qt = ctx.saved_tensors  # once: under activation checkpointing a second read is an error
        return g @ dequantize(ctx.shape, g.dtype, *qt), None, *([None] * len(qt))


class NF4Linear(nn.Module):
    """A frozen Linear stored in NF4. The quantized tensors are frozen Parameters (not buffers) so
    that FSDP2 shards them like any weight; the bias, if any, stays in the load dtype."""

    NAMES = ("codes", "absmax", "qabsmax", "absmax2", "offset")

    def __init__(self, linear: nn.Linear, double_quant=False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for name, t in quantize(linear.weight, double_quant).items():
            setattr(self, name, nn.Parameter(t, requires_grad=False))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def quant_tensors(self):
        return {n: getattr(self, n) for n in self.NAMES if hasattr(self, n)}

    def dequantize(self, dtype=torch.float32):
        return dequantize((self.out_features, self.in_features), dtype, **self.quant_tensors())

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # W dequantized straight into the compute dtype, not cast again
            x = x.to(torch.get_autocast_dtype(x.device.type))
        qt = self.quant_tensors()
        args = [qt["codes"]] + ([qt["absmax"]] if "absmax" in qt else [None, qt["qabsmax"], qt["absmax2"], qt["offset"]])
        y = _NF4Matmul.apply(x, (self.out_features, self.in_features), *args)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, double_quant={hasattr(self, 'qabsmax')}"


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_model(model: nn.Module, targets=TARGETS, double_quant=False):
    """Replace every nn.Linear whose leaf name is in `targets` by an NF4Linear (in place)."""
    for name, mod in list(model.named_modules()):
        for leaf, child in list(mod.named_children()):
            if type(child) is nn.Linear and leaf in targets:
                setattr(mod, leaf, NF4Linear(child, double_quant))
    return model
