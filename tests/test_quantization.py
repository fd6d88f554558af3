"""peft_edu.quantization against bitsandbytes 0.50.2 on CPU: the same code books, the same bytes, the same weights.

Every comparison is exact (``torch.equal``): the packed codes, the absmax constants (plain, and the 8-bit codes,
scales and mean of double quantisation) and the dequantised weights, for float32, bfloat16 and float16 weights,
including sizes that are not a multiple of the block (a partial last block, an odd number of values, rows shorter
than a block) and blocks that are all zero.
"""

from __future__ import annotations

import itertools
import math

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from peft_edu.quantization import (
    DYNAMIC_LEVELS,
    FP4_LEVELS,
    INT4_LEVELS,
    NF4_LEVELS,
    NF4_OFFSET,
    NF4Weight,
    _LEVEL_PAIR_WORDS,
    _absmax_lookup_table,
    dequantize_4bit,
    dequantize_nf4,
    nearest_level_index,
    pack_4bit,
    paper_bits_per_parameter,
    quantize_4bit,
    quantize_absmax,
    quantize_nf4,
)
from peft_edu.qlora import Linear4bit

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models", "uncompiled_bitsandbytes")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    (64, 64),     # whole blocks
    (130, 64),    # whole blocks, many
    (3, 100),     # 300 values: a partial last block of 44
    (7, 33),      # odd rows and an odd count: the last byte is padded
    (1, 10),      # one short block
    (10, 48),     # rows shorter than a block: blocks run across rows
    (300, 70),    # 21,000 values: more than 256 blocks, so double quantisation has a partial block of its own
    (129,),       # 1-D
    (3, 5, 7),    # 3-D
]


@pytest.fixture
def uncompiled_bitsandbytes():
    """bitsandbytes' PyTorch fallback (used for odd row lengths) is wrapped in torch.compile, which compiles it anew
    for every shape and dtype (13 s for six of them here); the same code runs uncompiled in milliseconds."""
    with torch._dynamo.config.patch(disable=True):
        yield


def weight_like_a_layer(shape, dtype, seed=0) -> torch.Tensor:
    """Heavy-tailed values (some blocks have outliers, some not), a zero first block and, for odd seeds, a zero
    partial last block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4 * 3
    flat = w.view(-1)
    flat[:64] = 0  # a whole zero block
    partial = flat.numel() % 64
    if partial and seed % 2:
        flat[-partial:] = 0  # a zero partial block
    return w.to(dtype)


def bnb_quantize(weight, double_quant):
    return bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def bnb_absmax(state) -> torch.Tensor:
    """bitsandbytes' float32 absmax per block (dequantised as its dequantize_4bit does)."""
    if not state.nested:
        return state.absmax
    return bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset


# --- the code books -----------------------------------------------------------------------------------
def test_the_nf4_levels_derived_from_normal_quantiles_are_bitsandbytes_table():
    theirs = bnb_functional.get_4bit_type("nf4", device="cpu")
    assert torch.equal(NF4_LEVELS, theirs)
    assert NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1 and (NF4_LEVELS.diff() > 0).all()
    assert (NF4_LEVELS == 0).sum() == 1 and (NF4_LEVELS < 0).sum() == 7 and (NF4_LEVELS > 0).sum() == 8  # asymmetric


def test_the_outermost_quantile_is_the_mean_of_the_15_and_16_bin_end_points():
    delta = ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2
    assert round(delta, 7) == NF4_OFFSET


def test_each_nf4_level_is_a_normal_quantile_scaled_to_one():
    """The positive levels are Φ⁻¹ at evenly spaced probabilities from δ to ½, divided by Φ⁻¹(δ)."""
    probabilities = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    expected = torch.special.ndtri(probabilities) / torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64))
    torch.testing.assert_close(NF4_LEVELS[8:].double(), expected.flip(0), atol=1e-6, rtol=0)


def test_the_8bit_dynamic_levels_are_bitsandbytes_map():
    assert torch.equal(DYNAMIC_LEVELS, bnb_functional.create_dynamic_map())
    assert DYNAMIC_LEVELS.numel() == 256 and (DYNAMIC_LEVELS.diff() > 0).all()


# --- bit for bit --------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_codes_and_absmax_are_bitsandbytes_bytes(shape, dtype, double_quant):
    weight = weight_like_a_layer(shape, dtype, seed=len(shape) + shape[0])
    codes, state = bnb_quantize(weight, double_quant)
    ours = quantize_nf4(weight, double_quant=double_quant)
    assert ours.codes.dtype == torch.uint8 and torch.equal(ours.codes, codes)
    assert ours.shape == state.shape and ours.dtype == state.dtype == dtype
    if double_quant:
        assert torch.equal(ours.absmax.codes, state.absmax)           # 8-bit codes of absmax − mean
        assert torch.equal(ours.absmax.scales, state.state2.absmax)   # one float32 per 256 of them
        assert torch.equal(ours.absmax.offset, state.offset)          # the mean
    else:
        assert torch.equal(ours.absmax, state.absmax)


def _bitsandbytes_cpu_kernel_reads_rows_right(shape) -> bool:
    """bitsandbytes 0.50.2's AVX-512 dequantisation kernel (row length a multiple of 16) indexes the absmax per row
    (row · (row_length // 64) + column // 64), which is only the flat block index when a row is a whole number of
    blocks; a (10, 48) weight is dequantised with the wrong scales. The scalar kernel (other even row lengths) and
    the PyTorch fallback (odd row lengths) index flat blocks, as the quantiser does."""
    row = shape[-1]
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return not (avx512 and row % 16 == 0 and row % 64 != 0)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantised_weights_are_bitsandbytes_weights(shape, dtype, double_quant):
    weight = weight_like_a_layer(shape, dtype, seed=1 + shape[0])
    codes, state = bnb_quantize(weight, double_quant)
    ours = dequantize_nf4(quantize_nf4(weight, double_quant=double_quant))
    assert ours.shape == weight.shape and ours.dtype == dtype
    # bitsandbytes' reference computation (its PyTorch fallback, what the CPU kernels are tested against)
    reference = _dequantize_4bit_compute.__wrapped__(codes.reshape(-1), bnb_absmax(state), NF4_LEVELS, 64, shape, dtype)
    assert torch.equal(ours, reference.reshape(shape))
    if _bitsandbytes_cpu_kernel_reads_rows_right(shape):
        assert torch.equal(ours, bnb_functional.dequantize_4bit(codes, state, quant_type="nf4").reshape(shape))


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="bitsandbytes' AVX-512 kernel only")
def test_bitsandbytes_avx512_kernel_misreads_rows_shorter_than_a_block():
    """The case excluded above, measured: its error is far beyond 4-bit rounding, ours is within it."""
    weight = weight_like_a_layer((10, 48), torch.float32, seed=3)
    codes, state = bnb_quantize(weight, False)
    theirs = bnb_functional.dequantize_4bit(codes, state, quant_type="nf4")
    ours = dequantize_nf4(quantize_nf4(weight))
    assert (ours - weight).abs().max() <= 0.152 * weight.abs().max()  # half the widest NF4 gap, −1 to −0.696
    assert not torch.equal(theirs, ours) and (theirs - weight).abs().max() > (ours - weight).abs().max()


def test_a_value_exactly_between_two_levels_gets_the_lower_one_as_in_bitsandbytes():
    midpoints = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2
    weight = torch.cat([torch.ones(1), midpoints, -torch.ones(64 - 16)]).reshape(1, 64)  # absmax 1: values stay put
    codes, _ = bnb_quantize(weight, False)
    ours = quantize_nf4(weight)
    assert torch.equal(ours.codes, codes)
    indices = torch.stack([ours.codes.view(-1) >> 4, ours.codes.view(-1) & 15], 1).reshape(-1)[1:16]
    assert torch.equal(indices.long(), torch.arange(15))  # midpoint i -> level i, the lower of its two


def test_zero_blocks_keep_zero_absmax_as_bitsandbytes_stores_it():
    weight = torch.zeros(2, 80)  # 160 values: two zero blocks of 64 and a zero partial block of 32
    ours = quantize_nf4(weight)
    _, state = bnb_quantize(weight, False)
    assert torch.equal(ours.absmax, state.absmax) and ours.absmax[0] == 0 and ours.absmax[-1] == 1e-38  # its floor
    assert torch.equal(dequantize_nf4(ours), weight)


def test_the_absmax_lookup_table_differs_from_the_nearest_level_only_next_to_a_midpoint():
    """bitsandbytes' CPU kernel rounds a scaled absmax to one of 65,536 grid points and takes the level nearest the
    point, not the value: another level than the nearest one only within half a grid step (1/65535) of a midpoint."""
    values = torch.linspace(-1, 1, 2_000_001)
    grid_index = ((values + 1.0) * 0.5 * 65535 + 0.5).long()
    table = _absmax_lookup_table()[grid_index].long()
    midpoints = 0.5 * (DYNAMIC_LEVELS[:-1] + DYNAMIC_LEVELS[1:])
    nearest = torch.bucketize(values, midpoints)
    differ = table != nearest
    assert differ.any()  # the shortcut is visible at this resolution ...
    distance = (values[differ].unsqueeze(1) - midpoints).abs().min(dim=1).values
    assert distance.max() <= 1 / 65535 + 1e-7  # ... but only next to a midpoint (half a step, plus float32 rounding)
    # the level it takes is at most two half-steps farther from the value than the nearest level (near 0, where the
    # levels are denser than the grid, that may be a few levels away)
    farther = (DYNAMIC_LEVELS[table] - values).abs() - (DYNAMIC_LEVELS[nearest] - values).abs()
    assert farther.max() <= 2 / 65535 + 1e-7


def test_double_quantisation_of_absmax_values_next_to_midpoints_is_bitsandbytes():
    """Absmax constants placed right at the table's boundaries, where the lookup and the nearest level disagree."""
    midpoints = 0.5 * (DYNAMIC_LEVELS[:-1] + DYNAMIC_LEVELS[1:])
    g = torch.Generator().manual_seed(0)
    offsets = (torch.rand(len(midpoints) * 4, generator=g) - 0.5) * 4e-5
    centred = torch.cat([torch.tensor([1.0, -1.0]), midpoints.repeat(4) + offsets]).clamp(-1, 1)
    absmax = centred + 2.0  # positive, like real absmax; quantize_absmax subtracts the mean again
    ours = quantize_absmax(absmax)
    codes, state = bnb_functional.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert torch.equal(ours.codes, codes) and torch.equal(ours.scales, state.absmax)
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_blockwise(codes, state) + absmax.mean())


# --- what the storage costs and what it keeps ---------------------------------------------------------------
def test_bits_per_parameter_follow_the_papers_arithmetic():
    assert paper_bits_per_parameter(double_quant=False) == 4 + 32 / 64 == 4.5
    assert paper_bits_per_parameter(double_quant=True) == pytest.approx(4.127, abs=5e-4)
    weight = torch.randn(1024, 1024)
    assert quantize_nf4(weight).bits_per_parameter() == 4.5
    stored = quantize_nf4(weight, double_quant=True)
    # + one float32 mean for the whole matrix: 32 bits over 2^20 weights
    assert stored.bits_per_parameter() == pytest.approx(paper_bits_per_parameter(True) + 32 / 2**20, rel=1e-12)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
def test_every_weight_is_within_half_a_level_gap_of_its_block_absmax(double_quant):
    weight = weight_like_a_layer((96, 200), torch.float32, seed=5)
    stored = quantize_nf4(weight, double_quant=double_quant)
    error = (dequantize_nf4(stored) - weight).view(-1)
    half_gap = NF4_LEVELS.diff().max() / 2  # 0.152: the widest gap is between −1 and −0.696
    scale = torch.repeat_interleave(stored.absmax_values(), 64)[: weight.numel()]
    true_absmax = torch.repeat_interleave(quantize_nf4(weight).absmax, 64)[: weight.numel()]
    # with double quantisation the scale itself is off by (scale − true absmax), which moves every value in proportion
    bound = half_gap * scale + (scale - true_absmax).abs()
    assert (error.abs() <= bound * (1 + 1e-6) + 1e-7).all()


def test_dequantise_to_another_dtype_rounds_once_from_float32():
    weight = weight_like_a_layer((4, 64), torch.bfloat16)
    stored = quantize_nf4(weight)
    as_float = dequantize_nf4(stored, torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(dequantize_nf4(stored), as_float.to(torch.bfloat16))


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight, error, message", [
    (torch.ones(4, 64, dtype=torch.int32), TypeError, "floating-point weights, not torch.int32"),
    (torch.ones(4, 64, dtype=torch.uint8), TypeError, "probably already 4-bit"),
    (torch.ones(4, 64, dtype=torch.float64), TypeError, "float32, bfloat16 or float16.*weight.float()"),
    (torch.zeros(0, 64), ValueError, "empty"),
    (torch.empty(4, 64, device="meta"), ValueError, "meta device"),
    (torch.tensor([[1.0, float("nan")] * 32]), ValueError, "NaN or infinite"),
    (torch.tensor([1.0] * 70 + [float("-inf")]), ValueError, "NaN or infinite"),  # in the partial last block
    ([[1.0, 2.0]], TypeError, "expects a torch.Tensor"),
], ids=["int", "uint8", "float64", "empty", "meta", "nan", "inf", "list"])
def test_a_weight_that_cannot_be_quantised_is_refused_with_the_reason(weight, error, message):
    with pytest.raises(error, match=message):
        quantize_nf4(weight)


def test_quantising_twice_is_refused():
    stored = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(TypeError, match="already quantised"):
        quantize_nf4(stored)


@pytest.mark.parametrize("block_size", [0, -64, 64.0, True, None])
def test_a_bad_block_size_is_refused(block_size):
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(torch.randn(4, 64), block_size=block_size)


def test_bad_arguments_of_dequantise_and_double_quant_are_refused():
    with pytest.raises(TypeError, match="reads an NF4Weight"):
        dequantize_nf4(torch.randn(4, 64))
    with pytest.raises(TypeError, match="double_quant"):
        quantize_nf4(torch.randn(4, 64), double_quant="yes")


def test_other_block_sizes_are_bitsandbytes_too():
    weight = weight_like_a_layer((8, 100), torch.float32, seed=2)
    for block_size, double_quant in itertools.product([32, 128, 256], [False, True]):
        codes, state = bnb_functional.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                                    compress_statistics=double_quant)
        ours = quantize_nf4(weight, block_size=block_size, double_quant=double_quant)
        assert torch.equal(ours.codes, codes) and torch.equal(ours.absmax_values(), bnb_absmax(state))
        assert math.prod(ours.shape) == 800 and isinstance(ours, NF4Weight)


# --- FP4 and int4: the same storage with other code books -----------------------------------------------
def test_the_fp4_levels_from_sign_exponent_and_mantissa_are_bitsandbytes_table():
    assert torch.equal(FP4_LEVELS, bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert FP4_LEVELS[8].item() == 0 and math.copysign(1, FP4_LEVELS[8].item()) == -1  # code 8 is −0
    magnitudes = sorted(set(FP4_LEVELS.abs().mul(12).tolist()))
    assert magnitudes == [0, 1 / 16, 2, 3, 4, 6, 8, 12]
    assert len(set(FP4_LEVELS.tolist())) == 15  # +0 and −0 are one level


def test_the_int4_levels_are_the_integers_minus_7_to_7_over_7_in_twos_complement():
    q = torch.tensor([c if c < 8 else c - 16 for c in range(16)])
    assert torch.equal(INT4_LEVELS, (q / 7).float())
    assert torch.equal(INT4_LEVELS[:8] * 7, torch.arange(8.0)) and INT4_LEVELS[8] == -8 / 7  # −8: never produced


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp4_codes_absmax_and_weights_are_bitsandbytes(shape, dtype, double_quant):
    weight = weight_like_a_layer(shape, dtype, seed=2 + shape[0])
    codes, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="fp4",
                                                compress_statistics=double_quant)
    ours = quantize_4bit(weight, "fp4", double_quant=double_quant)
    assert ours.quant_type == "fp4" and torch.equal(ours.codes, codes)
    assert torch.equal(ours.absmax_values(), bnb_absmax(state))
    dense = dequantize_4bit(ours)
    assert dense.dtype == dtype and dense.shape == weight.shape
    reference = _dequantize_4bit_compute.__wrapped__(codes.reshape(-1), bnb_absmax(state), FP4_LEVELS, 64, shape, dtype)
    assert torch.equal(dense, reference.reshape(shape))
    if _bitsandbytes_cpu_kernel_reads_rows_right(shape):  # bitsandbytes' C kernel, FP4 decoded from the bits
        assert torch.equal(dense, bnb_functional.dequantize_4bit(codes, state, quant_type="fp4").reshape(shape))


def test_fp4_values_next_to_zero_get_bitsandbytes_zero_codes():
    """+0 and −0 are the same level: small positive values get −0's code (8), small negative ones +0's (0)."""
    tiny = 1 / 384  # the midpoint between 0 and the smallest level, 1/192
    values = torch.tensor([1.0, 0.0, tiny / 2, tiny, -tiny / 2, -tiny, tiny * 1.01, -tiny * 1.01] + [0.0] * 56)
    codes, _ = bnb_functional.quantize_4bit(values.reshape(1, 64), blocksize=64, quant_type="fp4")
    ours = quantize_4bit(values.reshape(1, 64), "fp4")
    assert torch.equal(ours.codes, codes)
    assert nearest_level_index(values[1:8], FP4_LEVELS).tolist() == [0, 8, 8, 0, 9, 1, 9]


@pytest.mark.parametrize("shape", [(64, 64), (3, 100), (7, 33)], ids=str)
def test_int4_is_rounding_to_the_nearest_of_15_even_steps_of_the_absmax(shape):
    weight = weight_like_a_layer(shape, torch.float32, seed=4)
    stored = quantize_4bit(weight, "int4")
    flat = weight.reshape(-1)
    absmax = torch.repeat_interleave(stored.absmax, 64)[: flat.numel()]
    steps = flat / absmax.clamp(min=1e-38) * 7
    # the nearest integer; ties (none in this data) would go to the lower one
    expected = (torch.round(steps) * absmax / 7).reshape(shape)
    torch.testing.assert_close(dequantize_4bit(stored), expected, rtol=1e-6, atol=1e-7)
    indices = torch.stack([stored.codes.view(-1) >> 4, stored.codes.view(-1) & 15], 1).reshape(-1)
    assert not (indices == 8).any()  # −8 is never used


CODE_BOOK_ZERO = {"nf4": 7, "fp4": 0, "int4": 0}  # the code of 0 (FP4's +0), what bitsandbytes pads with


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_every_code_book_packs_an_odd_count_with_the_code_of_zero(quant_type):
    stored = quantize_4bit(torch.ones(1, 3), quant_type)
    last = stored.codes.view(-1)[-1].item() & 15
    assert CODE_BOOK_ZERO[quant_type] == last and torch.equal(dequantize_4bit(stored), torch.ones(1, 3))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_the_float64_pair_table_keeps_every_bit_even_when_denormals_are_flushed(quant_type):
    # the lookup copies 8-byte words typed float64; the word of a byte whose second level is 0 is a float64 denormal
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    stored = quantize_4bit(weight, quant_type)
    expected = dequantize_4bit(stored)
    assert torch.set_flush_denormal(True)  # x86 with SSE3: supported on the course's machines
    try:
        flushed = dequantize_4bit(stored)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(flushed, expected)
    levels = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}[quant_type]
    codes = stored.codes.view(-1).long()
    pairs = torch.stack([levels[codes >> 4], levels[codes & 15]], dim=1).view(-1)[: weight.numel()]
    assert torch.equal(expected.view(-1), (pairs.view(-1, 64) * stored.absmax_values()[:, None]).view(-1))
    words = _LEVEL_PAIR_WORDS[quant_type].view(torch.int64)
    assert ((words >> 52) & 0x7FF).eq(0).any()  # some words are float64 denormals: the case a flush would break


def test_nf4_has_the_smallest_error_of_the_three_on_normal_weights():
    """QLoRA's reason for NF4 (arXiv 2305.14314, §3): on normally distributed weights it beats FP4 and int4."""
    weight = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    error = {q: (dequantize_4bit(quantize_4bit(weight, q)) - weight).pow(2).mean().item() for q in ("nf4", "fp4", "int4")}
    assert error["nf4"] < error["int4"] < error["fp4"], error


def test_other_code_books_are_refused_where_only_nf4_is_meant():
    with pytest.raises(ValueError, match="quant_type='nf5'.*'nf4', 'fp4', 'int4'"):
        quantize_4bit(torch.randn(4, 64), "nf5")
    fp4 = quantize_4bit(torch.randn(4, 64), "fp4")
    with pytest.raises(ValueError, match="stored in fp4, not NF4: read it with dequantize_4bit"):
        dequantize_nf4(fp4)
    with pytest.raises(ValueError, match="Linear4bit stores NF4 weights, not fp4"):
        Linear4bit(fp4)
    with pytest.raises(ValueError, match="pack_4bit packs pairs"):
        pack_4bit(torch.zeros(3, dtype=torch.uint8))
