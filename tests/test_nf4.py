"""NF4 (nf4.py) against bitsandbytes, the oracle, on CPU; NF4Linear's forward and backward.

Single quantization must be bit-identical: same packed bytes (two codes per byte, high nibble first),
same fp32 absmax, same dequantized weights. Double quantization: the first level and the second
level's fp32 constants are identical; bitsandbytes' C CPU kernel then picks the 8-bit code of each
absmax with an approximate search (BinSearch Direct2, csrc/common.cpp) that returns the farther of
the two neighbouring levels for values within a hair of their midpoint; we pick the nearest (as its
reference torch kernel does). The test pins that: every other code, and the weights they produce,
are identical, and every differing code is a near-tie one level away.
"""
import pytest
import torch

import nf4

bnbf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(128, 64), (96, 256), (100, 192)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :64] = 0  # an all-zero block: absmax 0 must not divide by zero
    w[1, 3] = 0.3  # an outlier, as real weights have
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bit_identical_to_bitsandbytes(shape, dtype):
    w = weight(shape, dtype, seed=len(shape) + shape[0])
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = nf4.quantize(w)
    assert torch.equal(ours["codes"], packed.flatten())
    assert torch.equal(ours["absmax"], state.absmax)
    deq = nf4.dequantize(shape, dtype, **ours)
    assert deq.dtype == dtype and torch.equal(deq, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_matches_bitsandbytes(dtype):
    ties, total = 0, 0
    for seed, shape in enumerate(SHAPES + [(512, 512)]):
        w = weight(shape, dtype, seed)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = nf4.quantize(w, double_quant=True)
        assert torch.equal(ours["codes"], packed.flatten())
        assert torch.equal(ours["offset"], state.offset.reshape(1))
        assert torch.equal(ours["absmax2"], state.state2.absmax)
        same = ours["qabsmax"] == state.absmax
        # a differing code: one level away, and ours the nearer one (a near-tie)
        diff = ~same
        assert ((ours["qabsmax"].int() - state.absmax.int())[diff].abs() == 1).all()
        absmax = nf4.quantize(w)["absmax"]
        v = (absmax - ours["offset"]) / ours["absmax2"].repeat_interleave(256)[:len(absmax)]
        code = nf4.DYNAMIC
        d_ours, d_bnb = (v - code[ours["qabsmax"].long()]).abs(), (v - code[state.absmax.long()]).abs()
        assert (d_ours[diff] <= d_bnb[diff]).all()
        assert ((d_bnb - d_ours)[diff] < 1e-4).all()  # both levels within 1e-4 of equally near
        ties, total = ties + int(diff.sum()), total + len(same)
        deq, ref = nf4.dequantize(shape, dtype, **ours), bnbf.dequantize_4bit(packed, state)
        rows = same.repeat_interleave(64).view(shape)  # weights whose block's absmax code agrees
        assert torch.equal(deq[rows], ref[rows])
    assert ties < 0.01 * total


def test_nf4_linear_forward_backward():
    """Equals a dense Linear on the dequantized weight; the input gradient flows, nothing else
    gets one, and backward recomputes W instead of keeping it (no [out, in] float saved)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 192, bias=True)
    for dq in (False, True):
        q = nf4.NF4Linear(lin, double_quant=dq)
        dense = q.dequantize()
        x = torch.randn(3, 5, 128, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            saved = []
            y = q(x)
        assert all(t.numel() < lin.weight.numel() / 2 for t in saved if t.is_floating_point())
        ref = torch.nn.functional.linear(x2, dense, lin.bias)
        # same fp32 products summed in the same order by the same matmul kernel
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
        g = torch.randn_like(y)
        y.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)
        assert all(not p.requires_grad for p in q.parameters())
    model = torch.nn.Sequential()
    model.q_proj, model.lm_head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    nf4.quantize_model(model)
    assert isinstance(model.q_proj, nf4.NF4Linear) and type(model.lm_head) is torch.nn.Linear
