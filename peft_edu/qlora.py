r"""QLoRA: LoRA on a frozen 4-bit base (Dettmers et al., arXiv 2305.14314).

QLoRA stores each frozen weight W₀ in NF4 (see ``peft_edu.quantization``) and computes, in a 16- or 32-bit
*compute dtype*,

    h = dequant(W₀ᴺᶠ⁴) x + b + s · B A x

The adapter (A, B) is ordinary LoRA (``peft_edu.lora``), only the base is 4-bit. A and B take the dtype the
base computes in: float32 by default, bfloat16 when the 4-bit layers compute in bfloat16, as in the paper's
Eq. 5 (PEFT upcasts 16-bit adapters to float32 unless ``autocast_adapter_dtype=False``; for float32 adapters on
a bfloat16 base here, cast them after ``get_peft_model``).
Gradients flow through the frozen base to the layers below (∂L/∂x = dequant(W₀)ᵀ ∂L/∂h), never into it.

**Where the memory goes.** ``Linear4bit`` keeps the packed codes (½ byte per weight) and the absmax constants.
Forward dequantises W₀ into the compute dtype, multiplies, and drops the dense copy; backward dequantises it
again (``_LinearOn4bit``), as bitsandbytes does. Autograd keeps the packed weight, never the dense one, so the
frozen weights stay at ≈ 4.127 bits per parameter during training, at the cost of two dequantisations per step.

**Two ways to get a 4-bit model**, both adapted by LoRA and DoRA through the method contract (one
``dense_weight`` / ``set_dense_weight`` reader and writer per layer type, registered below):

* ``quantize_model(model)``: peft_edu quantises a loaded model itself (every ``nn.Linear`` but the output head,
  as transformers does), into ``Linear4bit`` layers; bit for bit what bitsandbytes stores.
* a model that transformers loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True)``: its ``bitsandbytes.nn.Linear4bit`` layers are read with bitsandbytes' own
  dequantisation. ``import peft_edu`` does not import bitsandbytes; the layers are recognised once it is loaded.

**Merging into a 4-bit base** does what PEFT does: dequantise W₀, add s·BA, quantise again. The merged layer
then holds quant(W₀ + s·BA): each weight rounded to the nearest NF4 level of its block (up to half a level gap,
0.152 × the block's absmax, away; a little more with double quantisation, whose absmax is itself rounded). An
update much smaller than that step is rounded away. Measured on a tiny Llama (``tests/test_qlora.py``): a merge
keeps 99 % of a ΔW as large as W₀ but 1 % of one whose largest entry is 0.0006 against W₀'s 0.083, and that
merged model is then nearer the base model than the adapted one. Unmerging rounds once more and does not give
W₀ back. To deploy a QLoRA adapter, keep it unmerged, or merge it into a 16- or 32-bit copy of the base.

**bitsandbytes on CPU, two things to know** (bitsandbytes 0.50.2; ``tests/test_quantization.py``, ``test_qlora.py``):
its AVX-512 dequantisation kernel reads the wrong absmax when a row of the weight (in_features) is a multiple
of 16 but not of the block size (64), so such layers compute with wrong weights; and on a CPU with AVX-512
BF16, a layer in eval mode whose input needs no gradient repacks itself for a fused kernel that computes
in bfloat16. ``Linear4bit`` does neither: it always dequantises correctly in its compute dtype.
"""

from __future__ import annotations

import abc
import copy
import sys

import torch
from torch import nn
from torch.nn import functional as F

from .injection import dense_weight, find_targets, replace_module, set_dense_weight
from .quantization import BLOCK_SIZE, SUPPORTED_DTYPES, NF4Weight, QuantizedAbsmax, dequantize_nf4, quantize_nf4


class _LinearOn4bit(torch.autograd.Function):
    """y = x dequant(W)ᵀ + b, keeping only the packed W for backward (dequantised again there)."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias):
        ctx.weight = weight  # the packed codes and absmax: no dense copy is kept
        return F.linear(x, dequantize_nf4(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.weight, grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, None, grad_bias


class Linear4bit(nn.Linear):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes' layout) and dequantised in forward.

    It is an ``nn.Linear`` (as bitsandbytes' ``Linear4bit`` is) so that every tool looking for linear layers finds
    it; ``weight`` is the packed uint8 codes (a frozen parameter), the absmax constants are buffers.
    ``compute_dtype``: the dtype of the matrix product, by default the dtype the weight was quantised from.
    Build one with ``Linear4bit.from_linear(linear)``, or a whole model with ``quantize_model``.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate the dense weight this layer replaces
        if not isinstance(weight, NF4Weight) or len(weight.shape) != 2:
            raise TypeError("Linear4bit stores a 2-D NF4Weight: quantize_nf4 of an (out_features, in_features) weight.")
        if weight.quant_type != "nf4":
            raise ValueError(f"Linear4bit stores NF4 weights, not {weight.quant_type}: quantise with quantize_nf4.")
        compute_dtype = compute_dtype or weight.dtype
        if compute_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype}: one of float32, bfloat16, float16.")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype, self.block_size, self.compute_dtype = weight.dtype, weight.block_size, compute_dtype
        self.weight = nn.Parameter(weight.codes, requires_grad=False)
        if weight.double_quant:
            self.register_buffer("absmax", weight.absmax.codes)
            self.register_buffer("absmax_scales", weight.absmax.scales)
            self.register_buffer("absmax_offset", weight.absmax.offset)
        else:
            self.register_buffer("absmax", weight.absmax)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)  # kept in full precision, as in bitsandbytes

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantise ``linear``'s weight (its bias is kept as it is); double quantisation on by default, as in QLoRA."""
        if isinstance(linear, Linear4bit) or isinstance(linear, BitsAndBytesLinear4bit):
            raise TypeError(f"This {type(linear).__name__} is already 4-bit; quantising it again would round twice.")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear quantises an nn.Linear, not a {type(linear).__name__}.")
        weight = quantize_nf4(linear.weight, block_size=block_size, double_quant=double_quant)
        return cls(weight, linear.bias, compute_dtype=compute_dtype)

    @property
    def double_quant(self) -> bool:
        return hasattr(self, "absmax_scales")

    def quantized(self) -> NF4Weight:
        """The stored weight as an ``NF4Weight`` (the module's own tensors, not copies)."""
        absmax = (QuantizedAbsmax(self.absmax, self.absmax_scales, self.absmax_offset) if self.double_quant
                  else self.absmax)
        return NF4Weight(self.weight, absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                         self.block_size)

    def dequantized_weight(self) -> torch.Tensor:
        """W₀ as the layer computes with it: dequantised into the compute dtype."""
        return dequantize_nf4(self.quantized(), self.compute_dtype)

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        """Quantise a new dense weight into this layer in place (merging), keeping its block size and double quant."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"Linear4bit stores a {expected} weight, not {tuple(weight.shape)}.")
        new = quantize_nf4(weight, block_size=self.block_size, double_quant=self.double_quant)
        self.weight.copy_(new.codes)
        if self.double_quant:
            self.absmax.copy_(new.absmax.codes)
            self.absmax_scales.copy_(new.absmax.scales)
            self.absmax_offset.copy_(new.absmax.offset)
        else:
            self.absmax.copy_(new.absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _LinearOn4bit.apply(x.to(self.compute_dtype), self.quantized(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4, block_size={self.block_size}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


class BitsAndBytesLinear4bit(abc.ABC):
    """Stands for ``bitsandbytes.nn.Linear4bit`` (and its subclasses) in ``isinstance`` and in the registrations
    below, without importing bitsandbytes: a class is one of them only if bitsandbytes is loaded and says so."""

    @classmethod
    def __subclasshook__(cls, candidate):
        bnb = sys.modules.get("bitsandbytes")
        return True if bnb is not None and issubclass(candidate, bnb.nn.Linear4bit) else NotImplemented


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, (Linear4bit, BitsAndBytesLinear4bit))


@torch.no_grad()
def quantize_model(model: nn.Module, target_modules: list[str] | str | None = None, block_size: int = BLOCK_SIZE,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` by ``Linear4bit`` (in place; the same model is returned).

    ``target_modules`` selects them as in ``LoraConfig`` (names or name suffixes, or one regex); by default every
    ``nn.Linear`` except the output head (``model.get_output_embeddings()``), which transformers' 4-bit loading
    also keeps in full precision. Quantise before ``get_peft_model``. All or nothing: if one layer cannot be
    quantised, none is replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects a torch.nn.Module, not {type(model).__name__}.")
    if hasattr(model, "peft_edu_config"):
        raise ValueError("This model has a peft_edu adapter: quantise the base model first, then call get_peft_model.")
    already = [name for name, m in model.named_modules() if _is_4bit(m)]
    if already or getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(f"This model is already 4-bit (e.g. {already[0] if already else 'loaded with load_in_4bit'}); "
                         "quantising it again would round its weights twice. Load the full-precision model instead.")
    if target_modules is not None:
        names = find_targets(model, target_modules)
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
        if not names:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer (besides its output head) to quantise.")
    replacements = {name: Linear4bit.from_linear(model.get_submodule(name), block_size, double_quant, compute_dtype)
                    for name in names}
    for name, layer in replacements.items():
        replace_module(model, name, layer)
    return model


# --- how peft_edu's methods read and write these layers (injection.py's accessor) ------------------------
@dense_weight.register
def _(layer: Linear4bit) -> torch.Tensor:
    return layer.dequantized_weight()


@set_dense_weight.register
def _(layer: Linear4bit, weight: torch.Tensor) -> None:
    layer.store(weight)


@dense_weight.register
def _(layer: BitsAndBytesLinear4bit) -> torch.Tensor:
    """bitsandbytes' own dequantisation (what its forward computes with), in the layer's compute dtype."""
    import bitsandbytes.functional as bnb_functional

    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # Repacked for bitsandbytes' fused CPU inference kernel: undo that on a copy, as its state_dict() does.
        data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    dense = bnb_functional.dequantize_4bit(data, state)
    return dense.to(layer.compute_dtype or dense.dtype)


@set_dense_weight.register
def _(layer: BitsAndBytesLinear4bit, weight: torch.Tensor) -> None:
    """Quantise ``weight`` into a new ``Params4bit`` with the layer's settings, as PEFT's 4-bit merge does."""
    import bitsandbytes as bnb

    if not torch.isfinite(weight).all():
        raise ValueError("The new weight has NaN or infinite values; bitsandbytes would store them silently and the "
                         "layer would compute NaN. The adapter's weights are not finite (a diverged run?).")
    old = layer.weight
    layer.weight = bnb.nn.Params4bit(
        weight.detach().to("cpu"), requires_grad=False, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
        module=layer).to(old.device)  # .to() quantises
