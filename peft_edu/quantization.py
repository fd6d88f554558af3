r"""4-bit NormalFloat (NF4) storage of a weight, as QLoRA does it (Dettmers et al., arXiv 2305.14314, §3).

QLoRA keeps the frozen base weights in 4 bits and trains LoRA in 16 or 32 bits on top. Four ideas, in the
order this module implements them:

1. **The NF4 code book.** Pretrained weights are roughly normal, so the 16 levels are placed at quantiles of
   N(0, 1), which gives every level about the same share of the weights. NF4 is asymmetric so that 0 is a level
   exactly (zero padding and zero weights stay zero): 8 levels for the positive half from 9 evenly spaced
   probabilities between δ and ½, 7 for the negative half from 8 between δ and ½, and one 0, each half with
   its own 0 (probability ½) dropped; then everything is divided by the largest, so the levels span [−1, 1]:

       positive:  Φ⁻¹(pᵢ), pᵢ = δ + i·(½ − δ)/8, i = 0…7        negative:  −Φ⁻¹(pⱼ), pⱼ = δ + j·(½ − δ)/7, j = 0…6

   Φ⁻¹(1) is infinite, so the outermost probability is δ < 1: bitsandbytes' 0.9677083, which is
   ½[(1 − 1/(2·15)) + (1 − 1/(2·16))] = 0.96770833… rounded (1 − 1/(2n) is the middle of the last of n
   equal-probability bins; here the mean for n = 15 and n = 16). bitsandbytes computes its table from the
   rounded δ, in float32; ``nf4_levels`` does the same and gets its 16 numbers bit for bit.
2. **Block-wise absmax.** Each block of 64 consecutive weights (in row-major order; the last block may be
   shorter) is divided by its largest |w|, its *absmax*, so it fits [−1, 1], and each value gets the index of
   the nearest level. One outlier then coarsens only its own block, not the whole matrix.
3. **Packing.** Two 4-bit indices per byte, the first value of each pair in the high nibble (bitsandbytes'
   order); an odd count is padded with the index of 0.
4. **Double quantisation.** The absmax constants cost 32 bits per 64 weights (0.5 bit per parameter). QLoRA
   quantises them too: subtract their mean, then 8-bit block-wise quantisation (bitsandbytes' signed
   "dynamic" code book, blocks of 256) with one float32 absmax per block:

       bits per parameter = 4 + 32/64 = 4.5             without double quantisation
                          = 4 + 8/64 + 32/(64·256) ≈ 4.127   with it (plus one float32 mean per matrix)

Dequantisation is level[index] × absmax, computed in float32 and rounded once to the weight's dtype.

**Bit for bit with bitsandbytes 0.50.2 on CPU** (``tests/test_quantization.py``): the packed bytes, the absmax
constants (plain and double-quantised) and the dequantised weights. Three details of its CPU code make
that so, and are reproduced here: a full block is multiplied by 1/absmax and the last, partial block divided
by its absmax (whose stored value is at least 1e-38); a value exactly between two NF4 levels gets the lower
one; and the 8-bit absmax quantisation does not search the 256 levels but rounds the scaled value to one
of 65,536 evenly spaced points of [−1, 1] and takes the level nearest that point from a table
(``_absmax_lookup_table``), so a value within half a step (1.5e-5) of a midpoint may get another level than
the nearest, one at most 3e-5 farther from it.
On a GPU, bitsandbytes' CUDA kernels compute the same format but are not checked here.

**Two other 4-bit code books, for comparison** (the QLoRA paper compares NF4 with both, Table 2): the same blocks,
absmax, packing and double quantisation, only the 16 levels differ (``quantize_4bit(weight, quant_type=...)``).

* ``"fp4"``: bitsandbytes' 4-bit float, a sign bit, 2 exponent bits and 1 mantissa bit; the code is the bit
  pattern. Its magnitudes are 0, 1/16 and 2^(4−e)·(1 + m/2) for exponent field e = 1…3 (2, 3, 4, 6, 8, 12), divided
  by 12. Bit for bit with bitsandbytes' ``quantize_4bit(quant_type="fp4")`` on CPU, codes, absmax and weights.
* ``"int4"``: symmetric integers, level q/7 for q = −7…7, stored as a two's-complement nibble (q mod 16). The code
  −8 is never produced (it would need |w| > absmax), so 0 and ±absmax are levels and the grid is even.
  bitsandbytes lists an "int4" table in ``get_4bit_type`` but cannot build it (0.50.2 raises on it) nor quantise
  to it, so this one is checked against rounding w/absmax·7 to the nearest integer instead.

FP4 and int4 each have 15 distinct levels (FP4 has +0 and −0; int4 never uses −8), NF4 has 16. Where a value
is equally near two codes of the same level (FP4's two zeros), the rule is bitsandbytes': sort the levels (a
stable sort, so +0 before −0), bucket by the midpoints, a value on a midpoint going to the lower. For FP4 that
sends values in (0, 1/384] of the absmax to −0 and values in (−1/384, 0] to +0; both dequantise to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_SIZE = 64  # weights per absmax constant (QLoRA's and bitsandbytes' default)
ABSMAX_BLOCK_SIZE = 256  # absmax constants per second-level constant in double quantisation
NF4_OFFSET = 0.9677083  # δ = ½(1 − 1/30 + 1 − 1/32) = 0.96770833…, rounded as bitsandbytes has it
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes quantises
_TINY = 1e-38  # bitsandbytes' floor for a divisor absmax (an all-zero block)


# --- the code books ----------------------------------------------------------------------------------
def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels (float32, ascending, from −1 to 1 with an exact 0), derived from normal quantiles."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # 8 quantiles above ½
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 mirrored ones
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


def dynamic_levels() -> torch.Tensor:
    """The 256 levels of bitsandbytes' signed 8-bit "dynamic" code book (Dettmers, arXiv 1511.04561), ascending.

    A byte is a sign bit, e zero bits (the exponent, 10^−e), a 1 bit that ends them, and 6 − e bits of a
    linear fraction in [0.1, 1]: 2^(6−e) values, the midpoints of that many equal steps; plus 0 and 1.
    Magnitudes from 5.5e-7 to 1 in 8 bits, the steps growing with the magnitude.
    """
    levels = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (6 - e) + 1)
        magnitudes = (10.0 ** -e * ((edges[:-1] + edges[1:]) / 2)).tolist()
        levels += magnitudes + [-m for m in magnitudes]
    return torch.tensor(sorted(levels), dtype=torch.float32)


def fp4_levels() -> torch.Tensor:
    """bitsandbytes' 16 FP4 levels (float32, in code order: the code is the bit pattern sign·e₁e₀·m).

    Exponent field e = 0 is subnormal: m/16 (0 or 1/16); e = 1…3 gives 2^(4−e)·(1 + m/2): 12, 8, 6, 4, 3, 2 for
    the largest first. Divided by the largest, 12, the magnitudes are 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1.
    """
    levels = []
    for code in range(16):
        sign = -1.0 if code & 0b1000 else 1.0
        exponent, mantissa = (code >> 1) & 0b11, code & 0b1
        magnitude = mantissa / 16 if exponent == 0 else 2.0 ** (4 - exponent) * (1 + mantissa / 2)
        levels.append(sign * magnitude)  # code 8 is −0.0, a second zero
    levels = torch.tensor(levels, dtype=torch.float32)
    return levels / levels.abs().max()


def int4_levels() -> torch.Tensor:
    """Symmetric 4-bit integers over 7 (float32, in code order): code c stands for q/7, q = c for c < 8 and c − 16
    (two's complement) above; q = −8 lies outside [−1, 1] and is never the nearest level of a scaled value."""
    codes = torch.arange(16)
    return (torch.where(codes < 8, codes, codes - 16) / 7).float()


NF4_LEVELS = nf4_levels()
FP4_LEVELS = fp4_levels()
INT4_LEVELS = int4_levels()
DYNAMIC_LEVELS = dynamic_levels()
CODE_BOOKS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}  # quant_type -> levels in code order


def _level_pair_words(levels: torch.Tensor) -> torch.Tensor:
    """The two levels each of the 256 byte values stands for (high nibble first), side by side in one 8-byte word:
    dequantising is then one 8-byte lookup per byte, with no shifts or masks, instead of unpacking nibbles and a
    lookup per value (several times faster on CPU; bitsandbytes' C kernel, one fused pass, is still ≈ 2× faster in
    isolation, see benchmarks/results/qlora_cpu.md). The words are typed float64 only because PyTorch's CPU
    index_select copies float64 faster than int64 (the lookup alone: about 290 against 390 µs for a 1536 × 576
    weight, one thread). A copy keeps every bit: a word is a float64 NaN only if its upper level is not finite, and
    the words whose upper level is 0 (float64 denormals) survive even ``torch.set_flush_denormal(True)`` (tested)."""
    byte = torch.arange(256)
    return torch.stack([levels[byte >> 4], levels[byte & 0x0F]], dim=1).view(torch.float64).view(-1)


_LEVEL_PAIR_WORDS = {name: _level_pair_words(levels) for name, levels in CODE_BOOKS.items()}


def nearest_level_index(scaled: torch.Tensor, levels: torch.Tensor = NF4_LEVELS) -> torch.Tensor:
    """The code (index into ``levels``) of the level nearest each value of ``scaled``, as uint8.

    bitsandbytes' rule: sort the levels (stably), bucket the values by the midpoints of neighbours, a value exactly
    on a midpoint going to the lower level, and map the bucket back to its code. NF4 is already sorted.
    """
    levels = levels.to(scaled.device)
    order = torch.argsort(levels, stable=True)
    ascending = levels[order]
    bucket = torch.bucketize(scaled, (ascending[:-1] + ascending[1:]) / 2)
    return order[bucket].to(torch.uint8)


def _absmax_lookup_table() -> torch.Tensor:
    """bitsandbytes' CPU shortcut for the nearest dynamic level: for each of 65,536 evenly spaced points of
    [−1, 1], the index of the level nearest to it (the number of midpoints below it)."""
    midpoints = 0.5 * (DYNAMIC_LEVELS[:-1] + DYNAMIC_LEVELS[1:])
    points = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    return torch.searchsorted(midpoints, points).to(torch.uint8)


_ABSMAX_TABLE = _absmax_lookup_table()


# --- the stored form -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedAbsmax:
    """Double quantisation: the absmax constants as 8-bit codes (absmax ≈ level[code] · scale + offset)."""

    codes: torch.Tensor   # uint8, one per absmax constant
    scales: torch.Tensor  # float32, the absmax of each block of 256 centred constants
    offset: torch.Tensor  # float32 scalar, the mean that was subtracted

    def dequantize(self) -> torch.Tensor:
        # Decoded on every call, not cached on the layer: a float32 cache would add 32 bits per 64 weights (0.5 bit
        # per parameter, 6.6 MB on SmolLM2), more than double quantisation saves (0.373), and decoding costs only
        # ≈ 4 % of dequantising the weight (benchmarks/results/qlora_cpu.md).
        # index_select, not DYNAMIC_LEVELS[codes.long()]: advanced indexing is several times slower on CPU.
        levels = torch.index_select(DYNAMIC_LEVELS.to(self.codes.device), 0, self.codes.int())
        return _scale_blocks_(levels, self.scales, ABSMAX_BLOCK_SIZE).add_(self.offset)


@dataclass(frozen=True)
class NF4Weight:
    """A weight stored in 4 bits (NF4 unless ``quant_type`` says otherwise): what ``quantize_nf4`` and
    ``quantize_4bit`` return and ``dequantize_nf4`` / ``dequantize_4bit`` read.

    ``codes``: uint8 of shape (⌈n/2⌉, 1), two 4-bit level indices per byte (bitsandbytes' layout);
    ``absmax``: one float32 per block, or a ``QuantizedAbsmax`` (double quantisation);
    ``shape`` and ``dtype``: the original weight's; ``block_size``: weights per absmax.
    """

    codes: torch.Tensor
    absmax: torch.Tensor | QuantizedAbsmax
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = BLOCK_SIZE
    quant_type: str = "nf4"  # which code book the codes index: "nf4", or "fp4" / "int4" (see the module docstring)

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, QuantizedAbsmax)

    def absmax_values(self) -> torch.Tensor:
        """The float32 absmax of every block (dequantised first under double quantisation)."""
        return self.absmax.dequantize() if self.double_quant else self.absmax

    def nbytes(self) -> int:
        """Bytes of storage: codes, absmax constants (and their own constants and mean)."""
        parts = [self.codes, self.absmax]
        if self.double_quant:
            parts = [self.codes, self.absmax.codes, self.absmax.scales, self.absmax.offset]
        return sum(t.numel() * t.element_size() for t in parts)

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / math.prod(self.shape)


def paper_bits_per_parameter(double_quant: bool, block_size: int = BLOCK_SIZE) -> float:
    """QLoRA's arithmetic: 4 + 32/64 = 4.5 bits, or 4 + 8/64 + 32/(64·256) ≈ 4.127 with double quantisation."""
    if not double_quant:
        return 4 + 32 / block_size
    return 4 + 8 / block_size + 32 / (block_size * ABSMAX_BLOCK_SIZE)


# --- quantising ----------------------------------------------------------------------------------------
def _blocks_scaled(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, every value divided by its block's absmax and clipped to [−1, 1]), as bitsandbytes
    computes them on CPU: full blocks times 1/absmax, the last partial block divided by its absmax (≥ 1e-38)."""
    full = flat.numel() - flat.numel() % block_size
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < flat.numel():
        last = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, (flat[full:] / last).clamp(-1, 1)])
    return absmax, scaled


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices (uint8, an even count) per byte, the first in the high nibble: shape (count/2, 1)."""
    if indices.numel() % 2:
        raise ValueError(f"pack_4bit packs pairs of indices; got {indices.numel()}. Pad an odd count with the code "
                         "of 0 first (quantize_4bit does).")
    return ((indices[0::2] << 4) | indices[1::2]).unsqueeze(1)


def quantize_absmax(absmax: torch.Tensor) -> QuantizedAbsmax:
    """Double quantisation of float32 absmax constants: centre on their mean, then 8-bit dynamic codes in blocks
    of 256, each block scaled by its own absmax (bitsandbytes' CPU kernel, table lookup included)."""
    offset = absmax.mean()
    count = absmax.numel()
    blocks = -(-count // ABSMAX_BLOCK_SIZE)
    # zero padding changes no block's absmax; the padded codes are cut off below
    centred = torch.nn.functional.pad(absmax - offset, (0, blocks * ABSMAX_BLOCK_SIZE - count)).view(blocks, -1)
    scales = centred.abs().amax(dim=1)
    empty = (scales == 0).unsqueeze(1)  # an all-zero block (e.g. a single constant, equal to the mean) gets code 0
    scaled = (centred * (1.0 / scales.masked_fill(scales == 0, 1.0)).unsqueeze(1)).clamp(-1, 1)
    codes = _ABSMAX_TABLE.to(scaled.device)[((scaled + 1.0) * 0.5 * 65535 + 0.5).long()]  # via the nearest grid point
    return QuantizedAbsmax(codes=codes.masked_fill(empty, 0).view(-1)[:count], scales=scales, offset=offset)


def _check_weight(weight, block_size: int, caller: str) -> None:
    if isinstance(weight, NF4Weight):
        raise TypeError("This weight is already quantised (an NF4Weight); quantising it again would add a second "
                        "rounding. Dequantise it first (dequantize_nf4) if you really mean to.")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{caller} expects a torch.Tensor (a layer's weight), not {type(weight).__name__}.")
    if not weight.is_floating_point():
        hint = (" A uint8 weight is probably already 4-bit (packed codes): read it through its layer instead."
                if weight.dtype == torch.uint8 else "")
        raise TypeError(f"{caller} quantises floating-point weights, not {weight.dtype}.{hint}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{caller} takes float32, bfloat16 or float16 weights (as bitsandbytes does), not "
                        f"{weight.dtype}; convert it first, e.g. weight.float().")
    if weight.is_meta or weight.numel() == 0:
        raise ValueError(f"{caller} needs a weight with values; this one is "
                         f"{'on the meta device' if weight.is_meta else 'empty'} (shape {tuple(weight.shape)}).")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r}: a positive number of weights per absmax (QLoRA uses 64).")


@torch.no_grad()
def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = BLOCK_SIZE,
                  double_quant: bool = False, caller: str = "quantize_4bit") -> NF4Weight:
    """Store ``weight`` (float32, bfloat16 or float16, any shape) in 4 bits with the code book ``quant_type``
    ("nf4", "fp4" or "int4") and one absmax per ``block_size`` values.

    With ``double_quant=True`` the absmax constants are themselves quantised to 8 bits (see the module docstring).
    For "nf4" and "fp4" the result equals bitsandbytes' ``quantize_4bit(weight, blocksize,
    compress_statistics=double_quant, quant_type=quant_type)`` on CPU, byte for byte.
    """
    if quant_type not in CODE_BOOKS:
        raise ValueError(f"quant_type={quant_type!r}: one of {', '.join(map(repr, CODE_BOOKS))}.")
    _check_weight(weight, block_size, caller)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant={double_quant!r}: True or False.")
    absmax, scaled = _blocks_scaled(weight.detach().reshape(-1).float(), block_size)
    if not torch.isfinite(absmax).all():  # a NaN or inf anywhere makes its block's absmax NaN or inf
        raise ValueError("The weight has NaN or infinite values; its block's absmax would be too, and every weight "
                         "of the block would dequantise to NaN. Find where they came from (a diverged merge?).")
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the last byte's second nibble: the code of 0
    codes = pack_4bit(nearest_level_index(scaled, CODE_BOOKS[quant_type]))
    return NF4Weight(codes=codes, absmax=quantize_absmax(absmax) if double_quant else absmax,
                     shape=weight.shape, dtype=weight.dtype, block_size=block_size, quant_type=quant_type)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = False) -> NF4Weight:
    """Store ``weight`` (float32, bfloat16 or float16, any shape) in NF4 with one absmax per ``block_size`` values.

    With ``double_quant=True`` the absmax constants are themselves quantised to 8 bits (see the module docstring).
    The result equals bitsandbytes' ``quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` on CPU, byte for byte.
    """
    return quantize_4bit(weight, "nf4", block_size, double_quant, caller="quantize_nf4")


def _scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """values × the absmax of their block, in float32, in place. The full blocks are a (blocks, block_size) view
    times a (blocks, 1) column of absmax (broadcasting: the absmax is never repeated to one per value, and nothing
    is copied); a partial last block is one slice times its absmax."""
    full = values.numel() // block_size
    end = full * block_size
    values[:end].view(full, block_size).mul_(absmax[:full].unsqueeze(1))
    if end < values.numel():
        values[end:].mul_(absmax[full])
    return values


def dequantize_4bit(weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight that ``weight`` stores: level[index] × absmax in float32 (the levels of its code book),
    then rounded once to ``dtype`` (default: the dtype it was quantised from)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"dequantize_4bit reads an NF4Weight (what quantize_4bit returns), not "
                        f"{type(weight).__name__}.")
    count = math.prod(weight.shape)
    words = _LEVEL_PAIR_WORDS[weight.quant_type].to(weight.codes.device)
    # One 8-byte lookup per byte gives both of its levels. index_select with int32 indices: advanced indexing
    # (words[codes.long()]) is several times slower, and a uint8 index would be read as a mask.
    pairs = torch.index_select(words, 0, weight.codes.view(-1).int())
    values = pairs.view(torch.float32)[:count]  # an odd count drops the padding value of the last byte
    absmax = weight.absmax_values().float()
    # Rounded once, after the float32 product (a no-op for float32). Multiplying straight into a bfloat16 output
    # (torch.mul(..., out=)) rounds the same but is slower on CPU: the cast then sits inside the multiply's loop.
    return _scale_blocks_(values, absmax, weight.block_size).to(dtype or weight.dtype).view(weight.shape)


def dequantize_nf4(weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize_4bit`` for an NF4 weight (what ``quantize_nf4`` returns)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"dequantize_nf4 reads an NF4Weight (what quantize_nf4 returns), not {type(weight).__name__}.")
    if weight.quant_type != "nf4":
        raise ValueError(f"This weight is stored in {weight.quant_type}, not NF4: read it with dequantize_4bit.")
    return dequantize_4bit(weight, dtype)
