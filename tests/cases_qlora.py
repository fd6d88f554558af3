"""The exercise-check cases of the QLoRA chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations

import torch

from chapter_cases import Chapter

from peft_edu import checks


# --- Exercise 1: a block's codes ----------------------------------------------------------------------
def _nearest(scaled, levels):
    return (scaled.unsqueeze(1) - levels).abs().argmin(dim=1)


def _below(scaled, levels):
    return (torch.searchsorted(levels, scaled, right=True) - 1).clamp(0, len(levels) - 1)


# --- Exercise 3: dequantise ---------------------------------------------------------------------------------
def _codes(packed, count, high_first=True):
    high, low = packed.long() >> 4, packed.long() & 0x0F
    return torch.stack([high, low] if high_first else [low, high], dim=1).reshape(-1)[:count]


QLORA = Chapter(
    name="qlora",
    questions={
        "q1": ("block_codes", checks.check_block_codes),
        "q2": ("pack_codes", checks.check_pack_codes),
        "q3": ("dequantize_blocks", checks.check_dequantize_blocks),
    },
    stub_must_not_contain=("argmin", "<< 4", "repeat_interleave"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("max-not-absmax", lambda block, levels: _nearest(block.float() / block.float().max(), levels),
             r"divide by block\.max\(\)"),
            ("not-scaled", lambda block, levels: _nearest(block.float(), levels), r"not scaled by the block's absmax"),
            ("level-below", lambda block, levels: _below(block.float() / block.float().abs().max(), levels),
             r"level just below"),
            ("std-scaled", lambda block, levels: _nearest(block.float() / block.float().std(), levels),
             r"mean magnitude or its standard deviation"),
            ("levels-not-indices", lambda block, levels: levels[_nearest(block.float() / block.float().abs().max(),
                                                                         levels)], r"the levels themselves"),
            ("float-indices", lambda block, levels: _nearest(block.float() / block.float().abs().max(),
                                                             levels).float() + 0.5, r"integer indices"),
            ("nf4-hard-coded", lambda block, levels: _nearest(block.float() / block.float().abs().max(),
                                                              checks.qlora.NF4_LEVELS),
             r"block_codes gives another index|returned shape"),
            ("a-list", lambda block, levels: _nearest(block.float() / block.float().abs().max(), levels).tolist(),
             r"returned a list; return a torch\.Tensor"),
        ],
        "q2": [
            ("low-nibble-first", lambda c: ((c[1::2] << 4) | c[0::2]).to(torch.uint8), r"second code of each pair"),
            ("halves-paired", lambda c: ((c[: len(c) // 2] << 4) | c[len(c) // 2:]).to(torch.uint8),
             r"first half of the codes with the second half"),
            ("no-shift", lambda c: (c[0::2] + c[1::2]).to(torch.uint8), r"not shifted by 4 bits"),
            ("int64-bytes", lambda c: (c.long()[0::2] << 4) | c.long()[1::2], r"a packed byte is torch\.uint8"),
            ("one-per-code", lambda c: c.to(torch.uint8), r"one per code"),
            ("column-shape", lambda c: ((c[0::2] << 4) | c[1::2]).to(torch.uint8).unsqueeze(1),
             r"return a 1-D tensor"),
            ("shift-by-8", lambda c: ((c.long()[0::2] << 8) | c.long()[1::2]).to(torch.uint8),
             r"not shifted by 4 bits"),
        ],
        "q3": [
            ("low-nibble-first", lambda p, a, levels, b, n: levels[_codes(p, n, high_first=False)]
             * torch.repeat_interleave(a, b)[:n], r"low nibble is read as the first code"),
            ("divides", lambda p, a, levels, b, n: levels[_codes(p, n)] / torch.repeat_interleave(a, b)[:n],
             r"divide by the absmax"),
            ("tiled-absmax", lambda p, a, levels, b, n: levels[_codes(p, n)] * a.repeat(b)[:n],
             r"repeated as a whole list"),
            ("sorted-levels", lambda p, a, levels, b, n: levels.sort().values[_codes(p, n)]
             * torch.repeat_interleave(a, b)[:n], r"index the sorted levels"),
            ("padding-kept", lambda p, a, levels, b, n: levels[_codes(p, 2 * len(p))]
             * torch.nn.functional.pad(torch.repeat_interleave(a, b), (0, 1))[: 2 * len(p)],
             r"Drop the padding code"),
            ("float64", lambda p, a, levels, b, n: (levels[_codes(p, n)] * torch.repeat_interleave(a, b)[:n]).double(),
             r"returned float64"),
            ("first-absmax-only", lambda p, a, levels, b, n: levels[_codes(p, n)] * a[0],
             r"dequantize_blocks gives other values"),
        ],
    },
)
