"""NF4 / QLoRA (lora_lab/nf4.py): the codebook and the quantizer against bitsandbytes and torchao, the error
bound, the frozen 4-bit layer's gradients and saved tensors, quantize_base, LoRA and its variants on top,
merging, adapters bound to the quantized base, and the CLI's --qlora."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import assert_same, snapshot, tiny_gpt, tokens

from lora_lab import LoRAConfig, apply_lora, load_adapter, merge_and_unload, merge_lora, save_adapter, set_fast_path
from lora_lab.errors import AdapterMismatchError, LoRAError
from lora_lab.fused import lora_together
from lora_lab.lora import VARIANTS, LoRALinear, QuantizedBaseError, lora_layers
from lora_lab.nf4 import (
    NF4Linear,
    QuantizationError,
    bits_per_parameter,
    code_midpoints,
    dequantize_absmax,
    dequantize_base,
    dequantize_nf4,
    nf4_codebook,
    nf4_layers,
    quantization_record,
    quantize_base,
    quantize_nf4,
    unpack_codes,
)

TESTS = Path(__file__).resolve().parent


def normal_weight(shape, seed=0, outliers=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    if outliers:
        idx = torch.randint(0, w.numel(), (outliers,), generator=gen)
        w.view(-1)[idx] *= 50  # a few large weights: blockwise absmax keeps them from coarsening other blocks
    return w


def block_scales(w, block_size=64):
    return w.reshape(-1, block_size).abs().amax(dim=1)


# ----------------------------------------------------------------------------------------------
# 1. The codebook


def test_codebook_is_normal_float_with_an_exact_zero():
    c = nf4_codebook()
    assert c.dtype == torch.float32 and c.shape == (16,)
    assert torch.all(c[1:] > c[:-1])
    assert c[7] == 0 and c[0] == -1 and c[-1] == 1
    assert (c > 0).sum() == 8 and (c < 0).sum() == 7  # asymmetric: 8 positive, 7 negative, and zero
    # each half holds quantiles at equal probability steps: Phi(c * Phi^-1(top)) is evenly spaced
    top = torch.special.ndtri(torch.tensor(1 - 0.5 * (1 / 30 + 1 / 32), dtype=torch.float64))
    p = torch.special.ndtr(c.double() * top)
    assert torch.allclose(p[8:].diff(), p[8:].diff()[0].expand(7), atol=1e-6)
    assert torch.allclose(p[:8].diff(), p[:8].diff()[0].expand(7), atol=1e-6)


def test_codebook_equals_bitsandbytes_nf4():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    theirs = bnbf.get_4bit_type("nf4", device="cpu")
    # bitsandbytes ships its table as literals computed once in its own float path; ours is derived here in
    # float64 and rounded once. They agree to 3 fp32 ulps (ulp(0.5) = 6e-8) - no code index can differ by it
    # except for a value within 2e-7 of a midpoint (the codes tests below find none).
    assert theirs.shape == (16,)
    assert torch.allclose(nf4_codebook(), theirs.float(), rtol=0, atol=2.5e-7)
    assert nf4_codebook()[7] == theirs[7] == 0 and nf4_codebook()[[0, -1]].tolist() == theirs[[0, -1]].tolist()


# ----------------------------------------------------------------------------------------------
# 2. Quantize / dequantize, against the field's implementations


SHAPES = [(128, 128), (256, 512), (64, 1024)]  # numel a multiple of 64 * 256, as torchao's double quant needs


@pytest.mark.parametrize("shape", SHAPES)
def test_codes_identical_to_bitsandbytes(shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = normal_weight(shape, seed=sum(shape), outliers=5)
    # Without double quantization bitsandbytes' CPU kernel stores the same codes in the same nibble order and
    # the same fp32 absmax. Its midpoints come from its own table, which differs from ours in the last fp32 digits
    # (<= 1.8e-7), so a code can differ (by one) only for a weight that close to a midpoint: on these tensors none
    # does; on the tiny base's 786,432 weights 2 do (benchmarks/RESULTS_qlora.md).
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q = quantize_nf4(w, double_quant=False)
    mine, theirs = unpack_codes(q.codes), unpack_codes(packed.flatten())
    x = (w.reshape(-1, 64) / block_scales(w)[:, None]).flatten()
    near = (x[:, None] - code_midpoints(nf4_codebook())).abs().min(dim=1).values <= 2e-7
    assert torch.equal(mine[~near], theirs[~near]) and ((mine - theirs).abs() <= 1).all()
    assert torch.equal(state.absmax, q.absmax)
    s = q.absmax.repeat_interleave(64).view(shape)
    deq = (bnbf.dequantize_4bit(packed, state) - dequantize_nf4(q)).abs()
    assert (deq <= 3.5e-7 * s)[~near.view(shape)].all()  # the codebooks' last digits, and the product's rounding
    # With double quantization the 4-bit codes are still identical (both take them from the exact absmax);
    # only the stored scales differ: bitsandbytes codes them with its 8-bit dynamic (non-linear) map, we with
    # symmetric int8 after the same mean subtraction. Each element then differs by at most the difference of
    # its block's two decoded scales (|code| <= 1), and ours are within half an int8 step of the truth.
    packed2, state2 = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q2 = quantize_nf4(w)
    assert torch.equal(packed2.flatten(), packed.flatten()) and torch.equal(q2.codes, q.codes)
    theirs_s = bnbf.dequantize_blockwise(state2.absmax, state2.state2) + state2.offset
    mine_s = dequantize_absmax(q2)
    gap = (theirs_s - mine_s).abs().repeat_interleave(64).view(shape)
    diff = (bnbf.dequantize_4bit(packed2, state2) - dequantize_nf4(q2)).abs()
    assert (diff <= gap + 1e-6 * s)[~near.view(shape)].all()
    true_s = block_scales(w)
    group = (true_s - true_s.mean()).abs().view(-1, 256).amax(dim=1).repeat_interleave(256)
    assert ((mine_s - true_s).abs() <= group / 254 + 1e-7).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_agrees_with_torchao_to_nf4(shape):
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    w = normal_weight(shape, seed=1 + sum(shape), outliers=5)
    t = nf4_tensor.to_nf4(w, 64, 256)
    q = quantize_nf4(w)
    # torchao's codebook is ours rounded to 4 decimals (it differs by <= 5.1e-5): an element's code differs only
    # where its normalized value lies that close to a midpoint between two codes, and then by one code.
    theirs_book = t.nf4.float()
    assert (theirs_book - nf4_codebook()).abs().max() <= 5.1e-5  # 0.0911 for -0.09105
    mine, theirs = unpack_codes(q.codes), unpack_codes(t.quantized_data)
    x = (w.reshape(-1, 64) / block_scales(w)[:, None]).flatten()
    near = (x[:, None] - code_midpoints(nf4_codebook())).abs().min(dim=1).values <= 5.1e-5
    assert torch.equal(mine[~near], theirs[~near])
    assert ((mine - theirs).abs() <= 1).all()
    assert (mine != theirs).float().mean() < 1e-3
    # Both double-quantize the absmax (mean subtracted, int8 in blocks of 256); torchao scales by 128/absmax and
    # clamps at 127, we by 127/absmax: both decoded scales stay within one int8 step of the truth.
    true_s = block_scales(w)
    group = (true_s - true_s.mean()).abs().view(-1, 256).amax(dim=1).repeat_interleave(256)
    theirs_s = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size).float()
    mine_s = dequantize_absmax(q)
    assert ((theirs_s - true_s).abs() <= group / 128 + 1e-6).all()
    assert ((mine_s - true_s).abs() <= group / 254 + 1e-6).all()
    # Where the codes agree, the dequantized weights differ by the two scales' difference and the codebooks'.
    same = (mine == theirs).view(shape)
    scale_gap = (theirs_s - mine_s).abs().repeat_interleave(64).view(shape)
    diff = (t.get_original_weight().float() - dequantize_nf4(q)).abs()
    assert (diff[same] <= (scale_gap + 5.1e-5 * mine_s.repeat_interleave(64).view(shape) + 1e-7)[same]).all()


def test_bits_per_parameter():
    w = normal_weight((256, 1024))  # 4096 blocks of 64, 16 groups of 256
    assert bits_per_parameter(quantize_nf4(w, double_quant=False)) == 4.5  # 4 + 32/64
    dq = bits_per_parameter(quantize_nf4(w))
    assert dq == 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()  # the paper's 4.127, plus the one mean
    assert abs(dq - 4.127) < 1e-3


def test_zero_and_the_block_maximum_are_exact():
    w = normal_weight((4, 64))
    w[0, :5] = 0
    w[1] = 0  # an all-zero block stays zero (no division by a zero absmax)
    q = quantize_nf4(w, double_quant=False)
    d = dequantize_nf4(q)
    assert (d[0, :5] == 0).all() and (d[1] == 0).all()
    top = w.abs().argmax(dim=1)
    assert torch.equal(d[torch.arange(4), top], w[torch.arange(4), top])  # ±absmax is a code times the absmax


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 8),
    blocks_per_row=st.integers(1, 6),
    block_size=st.sampled_from([2, 16, 64]),
    scale=st.floats(1e-4, 1e3),
    outliers=st.integers(0, 3),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_error_is_within_half_the_local_code_gap(rows, blocks_per_row, block_size, scale, outliers, double_quant, seed):
    w = normal_weight((rows, blocks_per_row * block_size), seed, outliers) * scale
    q = quantize_nf4(w, block_size=block_size, double_quant=double_quant, scale_block_size=4)
    d = dequantize_nf4(q)
    s = block_scales(w, block_size)
    x = (w.reshape(-1, block_size) / s[:, None]).flatten()
    c = nf4_codebook()
    i = torch.bucketize(x, c).clamp(1, 15)  # c[i-1] <= x <= c[i]: the two codes around x
    half_gap = (c[i] - c[i - 1]) / 2
    s_hat = dequantize_absmax(q)
    scale_err = (s_hat - s).abs()
    if double_quant:  # the decoded scale is within half an int8 step of its group's spread
        centred = F.pad(s - s.mean(), (0, -len(s) % 4))
        group = centred.abs().view(-1, 4).amax(dim=1).repeat_interleave(4)[: len(s)]
        assert (scale_err <= group / 254 + 1e-6 * s).all()
    else:
        assert torch.equal(s_hat, s)
    per = lambda t: t.repeat_interleave(block_size)  # noqa: E731
    bound = per(s) * half_gap + per(scale_err) + 1e-6 * per(s)  # |s x - s' c| <= s |x - c| + |s - s'| |c|
    assert ((d.flatten() - w.flatten()).abs() <= bound).all()


def test_bad_shapes_and_settings_are_named():
    with pytest.raises(QuantizationError, match=r"shape \(3, 7\).*blocks of 64"):
        quantize_nf4(torch.randn(3, 7))
    with pytest.raises(QuantizationError, match="block_size must be even"):
        quantize_nf4(torch.randn(4, 9), block_size=9)
    with pytest.raises(QuantizationError, match="positive integer"):
        quantize_nf4(torch.randn(4, 64), block_size=0)
    with pytest.raises(QuantizationError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int64))
    w = torch.randn(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_nf4(w)


# ----------------------------------------------------------------------------------------------
# 3. NF4Linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_returns_only_the_input_gradient(bias, double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=bias)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant)
    assert list(layer.parameters()) == ([layer.bias] if bias else []) and not any(
        p.requires_grad for p in layer.parameters()
    )
    W = dequantize_nf4(quantize_nf4(linear.weight, double_quant=double_quant))
    assert torch.equal(layer.weight, W)
    x = torch.randn(3, 5, 128, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_(True)
    ref = F.linear(x2, W, layer.bias)
    (gref,) = torch.autograd.grad(ref, x2, g)
    assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(gx, gref, atol=1e-6)
    # Saved for backward: only the layer's own quantized buffers (no input, no dequantized weight).
    buffers = {t.data_ptr() for t in layer.buffers()}
    assert saved and all(t.data_ptr() in buffers for t in saved)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == sum(t.numel() * t.element_size() for t in layer.buffers())
    assert saved_bytes < W.numel() * 4 / 7  # about 4.1-4.5 bits per weight instead of 32
    assert all(b.grad is None for b in layer.buffers())


def test_nf4_linear_dtypes_and_state():
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x.float()).dtype == torch.float32
    layer = layer.to(torch.bfloat16)  # the compute dtype follows; the fp32 scales and the codes do not
    assert layer.weight.dtype == torch.bfloat16 and layer(x).dtype == torch.bfloat16
    assert layer.absmax_scales.dtype == torch.float32 and layer.codes.dtype == torch.uint8
    assert set(layer.state_dict()) == {"codes", "absmax_codes", "absmax_scales", "absmax_mean", "bias"}
    other = NF4Linear.from_linear(nn.Linear(64, 32)).to(torch.bfloat16)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.weight, layer.weight)
    plain = layer.to_linear(torch.float32)
    # fp32 from the codes, not the bf16 weight upcast: dequantizing to fp32 loses nothing the codes hold
    assert type(plain) is nn.Linear and torch.equal(plain.weight, dequantize_nf4(layer.nf4_weight))
    assert plain.bias.dtype == torch.float32 and not plain.weight.requires_grad


def test_nf4_linear_under_autocast_matches_a_plain_linear_dtype():
    linear = nn.Linear(64, 32)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(x), linear(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert gx.dtype == torch.float32  # the gradient comes back in the input's dtype
    expected = torch.ones(4, 32) @ layer.weight
    torch.testing.assert_close(gx, expected, atol=0.05, rtol=0.02)  # bf16 matmul in backward


# ----------------------------------------------------------------------------------------------
# 4. quantize_base


def test_quantize_base_replaces_the_block_linears_and_keeps_the_tied_head():
    model = tiny_gpt()
    idx = tokens()
    _, before = model(idx, idx)
    assert quantize_base(model) is model
    names = sorted(nf4_layers(model))
    assert len(names) == 12 and all(n.startswith("blocks.") for n in names)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.tok_emb.weight
    _, after = model(idx, idx)
    assert abs(after.item() - before.item()) < 0.01 and after.item() != before.item()
    record = quantization_record(model)
    assert record["method"] == "nf4" and record["layers"]["blocks.0.mlp.up_proj"]["shape"] == [128, 32]
    assert quantization_record(tiny_gpt()) is None


def test_quantize_base_refusals_leave_the_model_unchanged():
    model = tiny_gpt()
    snap = snapshot(model)
    with pytest.raises(QuantizationError, match="nope"):
        quantize_base(model, targets=("q_proj", "nope"))
    with pytest.raises(QuantizationError, match="weight tying"):
        quantize_base(model, targets=("q_proj", "lm_head"))
    with pytest.raises(QuantizationError, match=r"'blocks.0.attn.k_proj'.*shape \(32, 32\).*blocks of 48"):
        quantize_base(model, targets=("k_proj",), block_size=48)
    assert_same(model, snap)
    quantize_base(model, targets=("q_proj",))
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_base(model, targets=("q_proj",))
    apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(QuantizationError, match="quantize the base first"):
        quantize_base(model, targets=("up_proj",))


def test_dequantize_base_gives_plain_linears_with_the_4bit_values():
    model = quantize_base(tiny_gpt())
    idx = tokens()
    logits, _ = model(idx)
    dequantize_base(model)
    assert not nf4_layers(model)
    assert torch.allclose(model(idx)[0], logits, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 5. LoRA and its variants on a 4-bit base


def qlora_model(variant="lora", targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), seed=0):
    model = quantize_base(tiny_gpt(seed=seed))
    torch.manual_seed(seed)
    return apply_lora(model, LoRAConfig(r=4, targets=targets, variant=variant))


def test_lora_trains_on_a_quantized_tiny_gpt():
    model = qlora_model().train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    idx = tokens(batch=4)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(
        n.split(".")[-1] in ("lora_A", "lora_B") for n, p in model.named_parameters() if p.requires_grad
    )
    opt = torch.optim.AdamW(trained, lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05 and losses[-1] == min(losses), losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the 4-bit base never moves


def test_the_qkv_fast_path_never_reads_a_quantized_weight():
    model = qlora_model()
    attn = model.blocks[0].attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(2, 5, 32)
    assert lora_together(layers, x, reference=LoRALinear.forward) is None  # each layer runs its own forward
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    idx = tokens()
    fast = model(idx)[0]
    set_fast_path(model, False)
    assert torch.equal(fast, model(idx)[0])
    # and on a plain base the same layers still join
    plain = apply_lora(tiny_gpt(), LoRAConfig(r=4))
    attn = plain.blocks[0].attn
    assert lora_together((attn.q_proj, attn.k_proj, attn.v_proj), x, reference=LoRALinear.forward) is not None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_on_a_quantized_base(variant):
    model = qlora_model(variant, targets=("q_proj", "v_proj")).train()
    idx = tokens()
    base = quantize_base(tiny_gpt())
    layer = model.blocks[0].attn.q_proj
    if layer.starts_at_base:
        torch.testing.assert_close(model(idx)[0], base(idx)[0], atol=1e-5, rtol=1e-5)
    _, loss = model(idx, idx)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(b.grad is None for b in layer.base.buffers())


# ----------------------------------------------------------------------------------------------
# 6. Merging a 4-bit base


def test_merge_lora_in_place_is_refused_and_merge_and_unload_dequantizes():
    model = qlora_model(targets=("q_proj", "up_proj"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    idx = tokens()
    adapted = model(idx)[0]
    snap = snapshot(model)
    with pytest.raises(QuantizedBaseError, match=r"merge LoRA in place.*quantized \(nf4.*merge_and_unload"):
        merge_lora(model)
    assert_same(model, snap)
    with pytest.warns(UserWarning, match=r"dequantized 12 4-bit layers \(4 adapted.*no longer 4-bit \(4 bytes"):
        merge_and_unload(model)
    assert not lora_layers(model) and not nf4_layers(model)  # one plain model: adapted and other layers alike
    assert type(model.blocks[0].attn.q_proj) is nn.Linear and model.blocks[0].attn.q_proj.weight.dtype == torch.float32
    assert type(model.blocks[0].attn.k_proj) is nn.Linear and model.blocks[0].attn.k_proj.weight.requires_grad
    torch.testing.assert_close(model(idx)[0], adapted, atol=1e-5, rtol=1e-5)


def test_a_refused_merge_and_unload_keeps_the_4bit_bases():
    model = qlora_model(targets=("q_proj",))
    with torch.no_grad():
        model.blocks[0].attn.q_proj.lora_B.fill_(1e30)
        model.blocks[0].attn.q_proj.lora_A.fill_(1e30)  # W + ΔW overflows to Inf
    snap = snapshot(model)
    with pytest.raises(LoRAError, match="NaN/Inf"):
        merge_and_unload(model)
    assert_same(model, snap)
    assert isinstance(model.blocks[0].attn.q_proj.base, NF4Linear)


def test_merge_and_unload_into_bf16():
    model = qlora_model(targets=("q_proj",))
    with pytest.warns(UserWarning, match=r"torch.bfloat16 nn.Linear layers.*2 bytes per weight"):
        merge_and_unload(model, dtype=torch.bfloat16)
    assert model.blocks[1].attn.q_proj.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# 7. Adapters bound to the quantized base


RELOAD = """
import json, sys
import torch
from tiny_models import tiny_gpt, tokens
from lora_lab import load_adapter
from lora_lab.nf4 import quantize_base
model = load_adapter(quantize_base(tiny_gpt()), sys.argv[1])
with torch.no_grad():
    print(json.dumps(model(tokens())[0].flatten().tolist()))
"""


def test_qlora_adapter_reloads_in_a_fresh_process_and_is_refused_on_the_full_precision_base(tmp_path):
    model = qlora_model(targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    save_adapter(model, tmp_path / "qlora")
    config = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    record = config["base_quantization"]
    assert record["method"] == "nf4" and len(record["layers"]) == 12
    assert record["layers"]["blocks.0.attn.q_proj"] == {
        "shape": [32, 32],
        "dtype": "float32",
        "block_size": 64,
        "double_quant": True,
        "scale_block_size": 256,
        "buffers": ["absmax_codes", "absmax_mean", "absmax_scales", "codes"],
    }
    assert "blocks.0.attn.q_proj.codes" in config["base_weights"]  # the digest is of the 4-bit base itself

    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "qlora")],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(TESTS)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = model(tokens())[0].flatten()
    assert torch.equal(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), expected)

    plain = tiny_gpt()
    snap = snapshot(plain)
    with pytest.raises(AdapterMismatchError, match=r"is a QLoRA adapter.*4-bit.*quantize_base.*allow_other_base=True"):
        load_adapter(plain, tmp_path / "qlora")
    assert_same(plain, snap)
    # opting in loads it onto the full-precision weights (shapes compared without the quantization)
    load_adapter(plain, tmp_path / "qlora", allow_other_base=True)
    assert len(lora_layers(plain)) == 4
    # another quantization (no double quantization) is refused too, naming both
    other = quantize_base(tiny_gpt(), double_quant=False)
    with pytest.raises(AdapterMismatchError, match="quantized otherwise.*with double quantization"):
        load_adapter(other, tmp_path / "qlora")


def test_a_16bit_adapter_is_refused_on_a_quantized_base(tmp_path):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    save_adapter(model, tmp_path / "lora")
    quantized = quantize_base(tiny_gpt())
    with pytest.raises(AdapterMismatchError, match="full-precision base.*12 layers in NF4"):
        load_adapter(quantized, tmp_path / "lora")
    load_adapter(quantized, tmp_path / "lora", allow_other_base=True)
    assert len(lora_layers(quantized)) == 8


# ----------------------------------------------------------------------------------------------
# 8. The command line


def test_cli_refuses_qlora_with_full(capsys, tmp_path, monkeypatch):
    from lora_lab.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["finetune", "--qlora", "--full", "--cache", str(tmp_path / "cache")])
    _, err = capsys.readouterr()
    assert code == 2 and "--qlora and --full" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_finetune_qlora_saves_an_adapter_bound_to_the_4bit_base(capsys, tmp_path):
    from test_tasks import write_synthetic_corpus

    from lora_lab.cli import main

    source = __import__("os").environ.get("LORA_LAB_DATA") or write_synthetic_corpus(tmp_path / "input.txt")
    base = ["--data", str(source), "--cache", str(tmp_path / "cache"), "--pretrain-iters", "20", "--device", "cpu"]
    out_dir = tmp_path / "qlora"
    code = main(["finetune", *base, "--quiet", "--steps", "6", "--eval-chars", "300", "--qlora", "--out", str(out_dir)])
    out, _ = capsys.readouterr()
    assert code == 0, out
    assert "QLoRA: 24 linear layers quantized to NF4 (4.1" in out and f"saved the adapter to {out_dir}" in out
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["base_quantization"]["method"] == "nf4"


def test_cli_sample_and_merge_run_a_qlora_adapter_on_its_4bit_base(capsys, tmp_path):
    from test_tasks import write_synthetic_corpus

    from lora_lab.cli import main

    source = __import__("os").environ.get("LORA_LAB_DATA") or write_synthetic_corpus(tmp_path / "input.txt")
    base = ["--data", str(source), "--cache", str(tmp_path / "cache"), "--pretrain-iters", "20", "--device", "cpu"]
    adapter = tmp_path / "qlora"
    argv = ["finetune", *base, "--quiet", "--steps", "4", "--eval-chars", "300", "--qlora", "--out", str(adapter)]
    assert main(argv) == 0
    capsys.readouterr()
    # the adapter's base record says how the base was quantized: sample and merge quantize it so, then load
    assert main(["sample", *base, "--adapter", str(adapter), "--chars", "20", "--seed", "1"]) == 0
    sampled, err = capsys.readouterr()
    assert err == "" and len(sampled.strip()) > 0
    with pytest.warns(UserWarning, match="no longer 4-bit"):
        code = main(["merge", *base, "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    assert code == 0, capsys.readouterr()
    from lora_lab import load_checkpoint

    merged, _ = load_checkpoint(tmp_path / "merged")
    assert not nf4_layers(merged) and not lora_layers(merged)
