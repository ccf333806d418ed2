"""QLoRA's 4-bit base (Dettmers et al. 2023, arXiv:2305.14314), written to be read top to bottom.

QLoRA fine-tunes LoRA adapters on top of a frozen base whose linear weights are stored in 4 bits. Four ideas:

1. The codebook. Trained weights are close to normally distributed, so the 16 values a 4-bit code can name
   are quantiles of N(0, 1) (NormalFloat, NF4), scaled to [-1, 1]: each code then covers about the same
   share of the weights. The positive half has 8 values and the negative half 7, so that 0 is exactly a
   code (padding and exact zeros stay exact) and ±1 are codes (a block's largest weight is stored exactly).
2. Blockwise absmax. The weight is cut into blocks of 64 consecutive numbers; each block is divided by its
   largest |value| (its absmax), so it lies in [-1, 1], and every number becomes the nearest code's index.
   One outlier then only coarsens its own block.
3. Double quantization. 32-bit absmax per 64 weights costs 0.5 bit per weight. The absmax values are
   themselves quantized: their mean is subtracted and they are stored as 8-bit codes in blocks of 256, with
   one fp32 scale per block of 256 (and the one mean): 8/64 + 32/(64*256) = 0.127 bit per weight.
4. Two codes per byte, and a frozen linear layer (NF4Linear) that dequantizes its weight in forward, in the
   input's dtype, and returns only the input's gradient: the base is never trained, so it needs no weight
   gradient and no optimizer state, and backward dequantizes again instead of keeping a 16/32-bit copy.

The sections below: 1. the codebook, 2. quantize / dequantize (NF4Weight), 3. NF4Linear, 4. quantize_base.
LoRA then trains on top unchanged (apply_lora finds NF4Linear as an nn.Linear); merging an NF4 base
dequantizes it (lora.merge_and_unload), and adapters bind to the quantized base (storage/adapters.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LoRAError
from .lora import LoRAConfig
from .targets import is_lora_layer, named_modules, parent_of, target_linears

BLOCK_SIZE = 64  # weights per absmax (the paper's choice)
SCALE_BLOCK_SIZE = 256  # absmax values per fp32 scale under double quantization
SCALE_CODE_MAX = 127  # absmax codes are symmetric int8: -127..127 (-128 unused, so that 0 is the centre)
# quantize_base's default: the layers LoRA adapts by default, plus the MLP (the QLoRA paper quantizes every
# linear of the transformer blocks; the tied embedding / lm_head stays in full precision).
DEFAULT_TARGETS = LoRAConfig().targets + ("up_proj", "down_proj")


class QuantizationError(LoRAError):
    """A weight or model that cannot be quantized as asked (bad block size, not a float weight, ...)."""


# ----------------------------------------------------------------------------------------------
# 1. The codebook: 16 quantiles of N(0, 1), exact zero included, scaled to [-1, 1]


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values (fp32, ascending, codebook[7] == 0, ends ±1).

    An even spread of probability: the 8 positive values are the N(0, 1) quantiles at 8 equal steps from
    `top` down to (but not including) 0.5, the 7 negative ones the same with 7 steps, and 0 is added. The
    outermost quantile cannot be at probability 1 (it would be infinite); `top` = 1 - delta with delta
    halfway between the 1/(2*15) and 1/(2*16) offsets that a symmetric 15- or 16-value code would use
    (the paper's appendix; bitsandbytes writes it as 0.9677083). Each half is then divided by its largest
    value, so both ends are exactly ±1. Computed in float64, rounded once to fp32.
    """
    top = 1 - 0.5 * (1 / 30 + 1 / 32)
    positive = torch.special.ndtri(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values, > 0
    negative = -torch.special.ndtri(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values, < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).to(torch.float32)  # both ends are the same quantile: ±1 exactly


CODEBOOK = nf4_codebook()  # computed once: quantize and dequantize use it on every call


def code_midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """The 15 points halfway between neighbouring codes: a normalized value's code is how many lie below it."""
    return (codebook[1:] + codebook[:-1]) / 2


# ----------------------------------------------------------------------------------------------
# 2. Quantize and dequantize


@dataclass(frozen=True)
class NF4Weight:
    """A weight in NF4. Tensors (all on the weight's device):

    codes          uint8 (numel / 2,)   two 4-bit codebook indices per byte, the first in the high nibble
    absmax         fp32 (n_blocks,)     each block's scale, without double quantization (else None)
    absmax_codes   int8 (n_blocks,)     with double quantization: round(127 * (absmax - mean) / group scale)
    absmax_scales  fp32 (n_groups,)     the largest |absmax - mean| in each group of scale_block_size blocks
    absmax_mean    fp32 ()              the mean absmax, subtracted before quantizing (absmax > 0: centring
                                        it spends the 8 bits on the spread, not on the offset)
    shape, dtype: the original weight's; block_size, scale_block_size: the layout.
    """

    codes: torch.Tensor
    absmax: torch.Tensor | None
    absmax_codes: torch.Tensor | None
    absmax_scales: torch.Tensor | None
    absmax_mean: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int = BLOCK_SIZE
    scale_block_size: int = SCALE_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return self.numel // self.block_size

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (None fields left out): what an NF4Linear keeps as buffers."""
        names = ("codes", "absmax", "absmax_codes", "absmax_scales", "absmax_mean")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def check_block_layout(shape, block_size: int, scale_block_size: int) -> None:
    """Refuse a layout that would not cut the weight into whole blocks (or that is not a layout at all)."""
    for name, value in (("block_size", block_size), ("scale_block_size", scale_block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise QuantizationError(f"NF4 {name} must be a positive integer, got {value!r}.")
    if block_size % 2:
        raise QuantizationError(f"NF4 block_size must be even (two 4-bit codes per byte), got {block_size}.")
    numel = math.prod(shape)
    if numel == 0 or numel % block_size:
        raise QuantizationError(
            f"A weight of shape {tuple(shape)} ({numel} numbers) does not divide into NF4 blocks of {block_size}: "
            f"its number of elements must be a positive multiple of the block size (pick a block size that "
            f"divides {numel}, or leave this layer out of the targets)."
        )


def quantize_absmax(absmax: torch.Tensor, scale_block_size: int):
    """Double quantization: (int8 codes, fp32 group scales, fp32 mean) of the positive block scales.

    A last group shorter than scale_block_size is padded with zeros (= the mean, after centring) only to
    find its largest value; the padding is never stored, so nothing has to be stripped later.
    """
    mean = absmax.mean()
    centred = absmax - mean
    n_groups = -(-centred.numel() // scale_block_size)  # ceil
    padded = F.pad(centred, (0, n_groups * scale_block_size - centred.numel()))
    scales = padded.view(n_groups, scale_block_size).abs().amax(dim=1)  # (n_groups,)
    per_block = scales.repeat_interleave(scale_block_size)[: centred.numel()]
    safe = torch.where(per_block > 0, per_block, torch.ones_like(per_block))  # a group of equal scales: codes 0
    codes = torch.round(centred / safe * SCALE_CODE_MAX).clamp(-SCALE_CODE_MAX, SCALE_CODE_MAX).to(torch.int8)
    return codes, scales, mean


def dequantize_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 block scales: stored as they are, or decoded from the double quantization."""
    if not q.double_quant:
        return q.absmax.float()
    per_block = q.absmax_scales.float().repeat_interleave(q.scale_block_size)[: q.n_blocks]
    return q.absmax_codes.float() / SCALE_CODE_MAX * per_block + q.absmax_mean.float()


def quantize_nf4(
    w: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = True, scale_block_size: int = SCALE_BLOCK_SIZE
) -> NF4Weight:
    """The NF4Weight of `w` (any shape whose element count is a multiple of block_size; values read
    row-major, so a block is 64 consecutive numbers of a row, or of consecutive rows)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise QuantizationError(f"quantize_nf4 needs a floating-point tensor, got {getattr(w, 'dtype', type(w))}.")
    check_block_layout(w.shape, block_size, scale_block_size)
    if not torch.isfinite(w).all():
        raise QuantizationError(f"A weight of shape {tuple(w.shape)} contains NaN or Inf; it cannot be quantized.")
    blocks = w.detach().float().reshape(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # The codes come from the exact absmax (as in bitsandbytes and torchao); only the stored scale is rounded.
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero block: every code is 0.0
    normalized = blocks / safe[:, None]  # in [-1, 1]
    idx = torch.bucketize(normalized, code_midpoints(CODEBOOK.to(w.device))).to(torch.uint8)  # nearest code
    idx = idx.flatten()
    codes = idx[0::2] << 4 | idx[1::2]  # two codes per byte: element 2i in the high nibble, 2i+1 in the low one
    if double_quant:
        absmax_codes, absmax_scales, absmax_mean = quantize_absmax(absmax, scale_block_size)
        return NF4Weight(
            codes, None, absmax_codes, absmax_scales, absmax_mean, tuple(w.shape), w.dtype, block_size, scale_block_size
        )
    return NF4Weight(codes, absmax, None, None, None, tuple(w.shape), w.dtype, block_size, scale_block_size)


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """The codebook indices (long, numel,) from the packed bytes (numel / 2,)."""
    return torch.stack([codes >> 4, codes & 0x0F], dim=1).flatten().long()


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight q stands for, as a tensor of q.shape in `dtype`: codebook[code] * block scale (fp32 math)."""
    values = CODEBOOK.to(q.codes.device)[unpack_codes(q.codes)]  # (numel,) in [-1, 1]
    w = values.view(q.n_blocks, q.block_size) * dequantize_absmax(q)[:, None]
    return w.view(q.shape).to(dtype)


def bits_per_parameter(q: NF4Weight) -> float:
    """Bits stored per weight, everything counted: 4 for the codes, plus the scales (fp32 absmax: 32/64;
    double quantized: 8/64 + 32/(64*256) + the one mean)."""
    return sum(t.numel() * t.element_size() * 8 for t in q.tensors().values()) / q.numel


# ----------------------------------------------------------------------------------------------
# 3. A frozen 4-bit linear layer


class NF4Matmul(torch.autograd.Function):
    """y = x @ dequantize(W)^T, whose backward gives x its gradient and W none.

    Saved for backward: only the quantized buffers the layer holds anyway (no activation, no 16/32-bit
    weight), and backward dequantizes W a second time. That is QLoRA's trade: a little more compute for a
    base that costs 4 bits per weight in memory during training too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        q = layer.nf4_weight
        ctx.layout = (q.shape, q.block_size, q.scale_block_size, list(q.tensors()))
        ctx.save_for_backward(*q.tensors().values())
        # dequantized in x's dtype; under autocast F.linear casts both to the autocast dtype as it would for
        # a plain nn.Linear
        return F.linear(x, dequantize_nf4(q, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        shape, block_size, scale_block_size, names = ctx.layout
        fields = dict(zip(names, ctx.saved_tensors))
        q = NF4Weight(
            fields["codes"],
            fields.get("absmax"),
            fields.get("absmax_codes"),
            fields.get("absmax_scales"),
            fields.get("absmax_mean"),
            shape,
            grad_out.dtype,
            block_size,
            scale_block_size,
        )
        grad_x = grad_out @ dequantize_nf4(q, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None  # nothing for the layer: the base is frozen


class NF4Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in NF4 (buffers: codes, absmax or its double quantization).

    It is an nn.Linear (in_features, out_features, bias) so that target patterns, apply_lora and every LoRA
    variant treat it as a base layer; but its weight is not a Parameter. `weight` is a read-only property
    that dequantizes (a new tensor each time, in the layer's dtype): what LoRALinear reads for its dtype and
    device, DoRA for its norm, PiSSA for its SVD. Writing a weight in place is impossible by construction;
    merging goes through `to_linear`, which makes a plain nn.Linear. The optional bias stays a full-precision
    (frozen) Parameter.

    The layer's dtype (`weight_dtype`) is the original weight's and follows model.to(dtype) / .half() like
    any module; the fp32 scales and the codes stay as they are.
    """

    quantized = "nf4"  # what lora.is_quantized checks (duck-typed: the spine before this file cannot import it)

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and initialise a full weight
        if not isinstance(q, NF4Weight):
            raise QuantizationError(f"NF4Linear needs an NF4Weight (from quantize_nf4), got {type(q).__name__}.")
        if len(q.shape) != 2:
            raise QuantizationError(f"NF4Linear needs a 2-D (out, in) weight, got shape {q.shape}.")
        self.out_features, self.in_features = q.shape
        self.weight_dtype = q.dtype
        self.block_size, self.scale_block_size = q.block_size, q.scale_block_size
        for name, t in q.tensors().items():
            self.register_buffer(name, t)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise QuantizationError(f"NF4Linear bias must have shape ({self.out_features},), got {tuple(bias.shape)}.")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> NF4Linear:
        """The NF4Linear of a plain nn.Linear (not changed), in that linear's train/eval mode."""
        if type(linear) is not nn.Linear:
            raise QuantizationError(f"NF4Linear.from_linear needs a plain nn.Linear, got {type(linear).__name__}.")
        layer = cls(quantize_nf4(linear.weight, block_size, double_quant), linear.bias)
        return layer.train(linear.training)

    @property
    def double_quant(self) -> bool:
        return "absmax" not in self._buffers

    @property
    def nf4_weight(self) -> NF4Weight:
        b = self._buffers
        return NF4Weight(
            b["codes"],
            b.get("absmax"),
            b.get("absmax_codes"),
            b.get("absmax_scales"),
            b.get("absmax_mean"),
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.block_size,
            self.scale_block_size,
        )

    @property
    def weight(self) -> torch.Tensor:  # (out, in), dequantized, a fresh tensor every call
        return dequantize_nf4(self.nf4_weight, self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = NF4Matmul.apply(x, self)
        # the bias in y's dtype: under autocast y is bf16, as a plain nn.Linear's output would be
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (in `dtype`, default the layer's): no longer 4-bit."""
        dtype = self.weight_dtype if dtype is None else dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype)
        linear.weight = nn.Parameter(dequantize_nf4(self.nf4_weight, dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return linear.train(self.training)

    def _apply(self, fn, recurse=True):
        # .to(dtype) would cast the fp32 scales like any float buffer; keep them fp32 and change only the dtype
        # the layer computes in (found by applying fn to an empty tensor of the current dtype).
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype, device=self.codes.device)).dtype
        super()._apply(fn, recurse)
        for name in ("absmax", "absmax_scales", "absmax_mean"):
            if name in self._buffers:
                self._buffers[name] = self._buffers[name].float()
        return self

    def bits_per_parameter(self) -> float:
        return bits_per_parameter(self.nf4_weight)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 block_size={self.block_size}{dq}"
        )


# ----------------------------------------------------------------------------------------------
# 4. Quantizing a model's frozen linears


def quantize_base(
    model: nn.Module, targets=DEFAULT_TARGETS, block_size: int = BLOCK_SIZE, double_quant: bool = True
) -> nn.Module:
    """Replace the model's target nn.Linear layers by NF4Linear, in place, and return the model.

    targets: module-name patterns as in LoRAConfig (default: the attention projections LoRA adapts by default,
    and the MLP). Quantize first, then apply_lora. Refused, with the model unchanged: a pattern that matches
    no nn.Linear, a tied weight (the embedding / lm_head), a weight whose size does not divide into blocks,
    a layer already quantized, a model that already carries LoRA layers.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    lora = [n for n, m in named_modules(model).items() if is_lora_layer(m)]
    if lora:
        raise QuantizationError(
            f"The model already carries LoRA layers ({lora[:3]}...): quantize the base first, then apply_lora "
            "(or merge_and_unload, then quantize)."
        )
    try:
        chosen = target_linears(model, targets, 1)
    except LoRAError as err:
        raise QuantizationError(f"quantize_base: {err}") from None
    already = [n for n, m in chosen.items() if isinstance(m, NF4Linear)]
    if already:
        raise QuantizationError(f"quantize_base: {already[:4]} are already quantized to NF4.")
    others = {n: type(m).__name__ for n, m in chosen.items() if type(m) is not nn.Linear}
    if others:
        raise QuantizationError(f"quantize_base replaces plain nn.Linear layers only; these are not: {others}.")
    layers = {}
    for name, linear in chosen.items():  # build every layer first: one failure leaves the model untouched
        try:
            layers[name] = NF4Linear.from_linear(linear, block_size, double_quant)
        except QuantizationError as err:
            raise QuantizationError(f"quantize_base: layer {name!r}: {err}") from None
    for name, layer in layers.items():
        parent, attr = parent_of(model, name)
        setattr(parent, attr, layer)
    return model


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The inverse of quantize_base, in place: every NF4Linear (not under a LoRA layer) becomes a plain nn.Linear
    holding its dequantized weight (in `dtype`, default the layer's). The values are the 4-bit ones: the
    original full-precision weights are gone. For an adapted model, merge_and_unload first."""
    lora = [n for n, m in named_modules(model).items() if is_lora_layer(m)]
    if lora:
        raise QuantizationError(
            f"The model carries LoRA layers ({lora[:3]}...): merge_and_unload or unload_lora first."
        )
    plain = {n: m.to_linear(dtype) for n, m in named_modules(model).items() if isinstance(m, NF4Linear)}
    for name, linear in plain.items():
        parent, attr = parent_of(model, name)
        setattr(parent, attr, linear)
    return model


def nf4_layers(model: nn.Module) -> dict[str, NF4Linear]:
    """{name of the plain layer: NF4Linear} for every NF4 base in the model, also those under a LoRA layer."""
    out = {}
    for name, module in named_modules(model).items():
        base = module.base if is_lora_layer(module) else module
        if isinstance(base, NF4Linear):
            out[name] = base
    return out


def quantization_record(model: nn.Module) -> dict | None:
    """What adapter files record about a quantized base (JSON): None if the model has no NF4 layer."""
    layers = nf4_layers(model)
    if not layers:
        return None
    return {
        "method": "nf4",
        "layers": {
            n: {
                "shape": [l.out_features, l.in_features],
                "dtype": str(l.weight_dtype).removeprefix("torch."),
                "block_size": l.block_size,
                "double_quant": l.double_quant,
                "scale_block_size": l.scale_block_size,
                "buffers": sorted(l._buffers),
            }
            for n, l in sorted(layers.items())
        },
    }


def quantize_like(model: nn.Module, record: dict) -> nn.Module:
    """Quantize `model` as quantization_record described another one (for example the base a QLoRA adapter was
    trained on): the layers it names, with its block settings, by quantize_base. Refused, with the model
    unchanged, where the record cannot be followed: settings that differ between its layers, or not these."""
    layers = record.get("layers") if isinstance(record, dict) else None
    if not isinstance(layers, dict) or not layers or record.get("method") != "nf4":
        raise QuantizationError(f"Not an NF4 quantization record: {str(record)[:200]}")
    keys = ("block_size", "double_quant", "scale_block_size")
    settings = {tuple(info.get(k) for k in keys) if isinstance(info, dict) else None for info in layers.values()}
    if len(settings) != 1:
        raise QuantizationError(f"The record's layers were quantized with different settings: {settings}.")
    ((block_size, double_quant, scale_block_size),) = settings
    if scale_block_size != SCALE_BLOCK_SIZE:
        raise QuantizationError(
            f"The record's scales were quantized in blocks of {scale_block_size!r}; quantize_base uses "
            f"{SCALE_BLOCK_SIZE}."
        )
    return quantize_base(model, tuple(sorted(layers)), block_size, double_quant)
