"""The QLoRA chapter's exercise checks (``notebooks/qlora.ipynb``): a block's 4-bit codes, packing two codes into a
byte, and dequantising packed blocks.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call. Every seed draws new values; the shapes, the
input dtypes (float32, bfloat16, float16 for weights; uint8 or int64 for codes) and the code books (NF4, int4, and
FP4 in its bit-pattern order) vary with the seed, so an answer that hard-codes NF4, float32 or a block of 64 fails
a hidden test. The reference is ``peft_edu.quantization``, the code the chapter shows to equal bitsandbytes.
"""

from __future__ import annotations

import torch

from ..quantization import FP4_LEVELS, INT4_LEVELS, NF4_LEVELS, nearest_level_index
from .core import Exercise, _answer_kind, _fail, _probe_each_case, _require_callable, _run, _value_of

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _weights(g: torch.Generator, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Values of the size and spread of a layer's weights (their scale varies from value to value)."""
    return (torch.randn(count, generator=g) * (0.5 + torch.rand(count, generator=g)) * 0.05).to(dtype)


def _tensor(got, what: str, args: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"For {args}, {what} returned a {kind}; return a torch.Tensor.")
    return got


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


# --- Exercise 1: the 4-bit codes of one block ---------------------------------------------------------
def _codes_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ascending_int4 = INT4_LEVELS.sort().values[1:]  # −7/7 … 7/7, the 15 levels a scaled value can take
    cases = []
    for i, (size, levels) in enumerate([(64, NF4_LEVELS), (17 + seed % 23, NF4_LEVELS), (32, ascending_int4)]):
        block = _weights(g, size, _WEIGHT_DTYPES[(seed + i) % 3])
        block[int(torch.randint(size, (1,), generator=g))] = -block.abs().max() * 1.5  # the absmax is negative
        cases.append({"block": block, "levels": levels.clone()})
    return {"cases": cases}


def _codes_probe(block_codes, request: dict) -> dict:
    observed = _answer_kind(block_codes)
    if observed["callable"]:
        observed["calls"] = [_run(block_codes, case["block"].clone(), case["levels"].clone())
                             for case in request["cases"]]
    return observed


def _codes_judge(request: dict, observed: dict) -> None:
    """``block_codes(block, levels)``: for each value, the index of the level nearest value / max|block|."""
    _require_callable(observed, "block_codes")
    for case, call in zip(request["cases"], observed["calls"]):
        block, levels = case["block"], case["levels"]
        args = f"a block of {_describe(block)} and {len(levels)} levels"
        got = _tensor(_value_of(call, "block_codes"), "block_codes", args)
        flat = block.float()
        want = nearest_level_index(flat / flat.abs().max(), levels).long()
        if got.shape != want.shape:
            _fail(f"For {args}, block_codes returned shape {tuple(got.shape)}; return one index per value, "
                  f"shape {tuple(want.shape)}.")
        if got.is_floating_point():
            if torch.equal(got.float(), levels[want]):
                _fail(f"For {args}, block_codes returned the levels themselves; return their indices (integers), "
                      "which are what the 4 bits store.")
            _fail(f"For {args}, block_codes returned {str(got.dtype).removeprefix('torch.')} values; return "
                  "integer indices into levels.")
        got = got.long()
        scaled = flat / flat.abs().max()
        midpoints = (levels[:-1] + levels[1:]) / 2
        differ = got != want
        near_a_tie = (scaled[differ].unsqueeze(1) - midpoints).abs().min(dim=1).values < 1e-6 if differ.any() else None
        if not differ.any() or (near_a_tie.all() and ((got - want).abs() <= 1).all()):
            continue  # equal, but for values on a midpoint (to rounding), where either neighbour is as near
        if torch.equal(got, nearest_level_index(flat / flat.max(), levels).long()):
            _fail(f"For {args}: you divide by block.max(), but the largest value of this block is negative. Scale by "
                  "the largest magnitude, block.abs().max(), so every value lands in [−1, 1].")
        if torch.equal(got, nearest_level_index(flat, levels).long()):
            _fail(f"For {args}: the values are not scaled by the block's absmax first, so they all fall near the "
                  "middle levels. Divide by block.abs().max() before finding the nearest level.")
        below = (torch.searchsorted(levels, scaled, right=True) - 1).clamp(0, len(levels) - 1)
        if torch.equal(got, below):
            _fail(f"For {args}: you take the level just below each value, not the nearest one. Compare with the "
                  "midpoints between neighbouring levels (or take the argmin of the distances).")
        if torch.equal(got, nearest_level_index(flat / flat.abs().mean(), levels).long()) or \
                torch.equal(got, nearest_level_index(flat / flat.std(), levels).long()):
            _fail(f"For {args}: the block is scaled by its mean magnitude or its standard deviation; absmax "
                  "quantisation scales by the largest magnitude, so ±absmax map to ±1.")
        wrong = int((got != want).sum())
        _fail(f"For {args}, block_codes gives another index for {wrong} of {len(want)} values. Scale the block by "
              "its absmax and take, for each value, the index of the nearest level.")


check_block_codes = Exercise(
    "function", _codes_request, _codes_probe, _codes_judge,
    doc="``block_codes(block, levels)``: the index of the level nearest each value / block.abs().max().")


# --- Exercise 2: two codes per byte ----------------------------------------------------------------------
def _pack_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i, count in enumerate([16, 2 * (5 + seed % 11), 2 * (40 + seed % 7)]):
        codes = torch.randint(16, (count,), generator=g)
        codes[:4] = torch.tensor([15, 0, 1, 14])  # both nibbles in use: 0xF0 and 0x1E
        cases.append({"codes": codes.to(torch.uint8 if (seed + i) % 2 == 0 else torch.int64)})
    return {"cases": cases}


def _pack_probe(pack_codes, request: dict) -> dict:
    return _probe_each_case(pack_codes, request["cases"], lambda case: (case["codes"].clone(),))


def _pack_judge(request: dict, observed: dict) -> None:
    """``pack_codes(codes)``: one uint8 per pair, the first code of each pair in the high nibble."""
    _require_callable(observed, "pack_codes")
    for case, call in zip(request["cases"], observed["calls"]):
        codes = case["codes"]
        args = f"{len(codes)} codes ({str(codes.dtype).removeprefix('torch.')})"
        got = _tensor(_value_of(call, "pack_codes"), "pack_codes", args)
        c = codes.long()
        want = (c[0::2] << 4) | c[1::2]
        if got.numel() == len(codes):
            _fail(f"For {args}, pack_codes returned {got.numel()} values, one per code: two codes share a byte, so "
                  f"return {len(want)} bytes.")
        if got.shape != want.shape:
            _fail(f"For {args}, pack_codes returned shape {tuple(got.shape)}; return a 1-D tensor of "
                  f"{len(want)} bytes.")
        if got.dtype != torch.uint8:
            _fail(f"For {args}, pack_codes returned {str(got.dtype).removeprefix('torch.')}; a packed byte is "
                  "torch.uint8 (convert the result with .to(torch.uint8)).")
        got = got.long()
        if torch.equal(got, want):
            continue
        if torch.equal(got, (c[1::2] << 4) | c[0::2]):
            _fail(f"For {args}: the second code of each pair is in the high nibble. bitsandbytes (and this course) put "
                  "the first code in the high nibble: byte = first << 4 | second.")
        half = len(c) // 2
        if torch.equal(got, (c[:half] << 4) | c[half:]):
            _fail(f"For {args}: you pair the first half of the codes with the second half; pair neighbours, codes "
                  "0 and 1, 2 and 3, ... (codes[0::2] and codes[1::2]).")
        if torch.equal(got, (c[0::2] + c[1::2]) & 0xFF) or torch.equal(got, (c[0::2] << 8 | c[1::2]) & 0xFF) or \
                torch.equal(got, (c[0::2] * 4 + c[1::2]) & 0xFF):
            _fail(f"For {args}: the first code is not shifted by 4 bits (× 16) into the high nibble, so the two codes "
                  "overlap or the first is lost.")
        _fail(f"For {args}, pack_codes gives other bytes. Each byte holds two neighbouring codes: first << 4 | second.")


check_pack_codes = Exercise(
    "function", _pack_request, _pack_probe, _pack_judge,
    doc="``pack_codes(codes)``: uint8 bytes, each holding codes 2i (high nibble) and 2i+1 (low nibble).")


# --- Exercise 3: dequantise packed blocks ----------------------------------------------------------------
def _dequant_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i, (block_size, count, levels) in enumerate([(64, 256, NF4_LEVELS),
                                                     (16 + 16 * (seed % 3), 101 + seed % 30, NF4_LEVELS),
                                                     (32, 75 + 2 * (seed % 5), FP4_LEVELS)]):
        blocks = -(-count // block_size)
        codes = torch.randint(16, (count + count % 2,), generator=g)
        packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)
        absmax = (0.01 + torch.rand(blocks, generator=g)).float()
        cases.append({"packed": packed, "absmax": absmax, "levels": levels.clone(), "block_size": block_size,
                      "count": count})
    return {"cases": cases}


def _dequant_probe(dequantize_blocks, request: dict) -> dict:
    observed = _answer_kind(dequantize_blocks)
    if observed["callable"]:
        observed["calls"] = [_run(dequantize_blocks, c["packed"].clone(), c["absmax"].clone(), c["levels"].clone(),
                                  c["block_size"], c["count"]) for c in request["cases"]]
    return observed


def _unpacked(packed: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    high, low = packed.long() >> 4, packed.long() & 0x0F
    return torch.stack([high, low] if high_first else [low, high], dim=1).reshape(-1)


def _dequant_judge(request: dict, observed: dict) -> None:
    """``dequantize_blocks(packed, absmax, levels, block_size, count)``: levels[code] × its block's absmax, float32,
    the first ``count`` values."""
    _require_callable(observed, "dequantize_blocks")
    for case, call in zip(request["cases"], observed["calls"]):
        packed, absmax, levels, b, n = (case[k] for k in ("packed", "absmax", "levels", "block_size", "count"))
        args = f"{n} values in blocks of {b} ({len(absmax)} absmax, {'FP4' if levels[1] > 0 else 'NF4'} levels)"
        got = _tensor(_value_of(call, "dequantize_blocks"), "dequantize_blocks", args)
        scale = torch.repeat_interleave(absmax, b)
        codes = _unpacked(packed)
        want = levels[codes[:n]] * scale[:n]
        if got.shape != want.shape:
            hint = (" Drop the padding code of the last byte: return the first count values." if got.numel() == n + 1
                    else "")
            _fail(f"For {args}, dequantize_blocks returned shape {tuple(got.shape)}; return {n} values, 1-D.{hint}")
        if got.dtype != torch.float32:
            _fail(f"For {args}, dequantize_blocks returned {str(got.dtype).removeprefix('torch.')}; compute and return "
                  "float32, as the levels and absmax are.")
        if torch.allclose(got, want, rtol=1e-6, atol=0):
            continue
        if torch.allclose(got, levels[_unpacked(packed, high_first=False)[:n]] * scale[:n], rtol=1e-6, atol=0):
            _fail(f"For {args}: the low nibble is read as the first code. The first code of each byte is its high "
                  "nibble, byte >> 4; the second is byte & 15.")
        if torch.allclose(got, levels[codes[:n]] / scale[:n], rtol=1e-6, atol=0):
            _fail(f"For {args}: you divide by the absmax. Quantising divided by it; dequantising multiplies back.")
        if torch.allclose(got, levels[codes[:n]] * absmax.repeat(b)[:n], rtol=1e-6, atol=0):
            _fail(f"For {args}: the absmax are repeated as a whole list (tile), not each one block_size times "
                  "(repeat_interleave): value i belongs to block i // block_size.")
        if torch.allclose(got, torch.sort(levels).values[codes[:n]] * scale[:n], rtol=1e-6, atol=0):
            _fail(f"For {args}: you index the sorted levels. A code is a position in levels as given (FP4's are in "
                  "bit-pattern order, not ascending): use levels[code].")
        _fail(f"For {args}, dequantize_blocks gives other values. Unpack two codes per byte (high nibble first), look "
              "each up in levels and multiply by the absmax of its block (value i is in block i // block_size).")


check_dequantize_blocks = Exercise(
    "function", _dequant_request, _dequant_probe, _dequant_judge,
    doc="``dequantize_blocks(packed, absmax, levels, block_size, count)``: levels[code] × absmax of its block, float32.")
