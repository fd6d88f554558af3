"""How far ``merge`` then ``unmerge`` moves the frozen weights, per dtype: rounding, measured on MiniLM.

LoRA (and DoRA) adapters on MiniLM's query and value projections (r=8, alpha=16, B ~ N(0, 0.02²) so that
ΔW is not zero) are merged and unmerged once; the script prints, per dtype, the largest change of a frozen
weight, that change relative to the largest weight, and how many weight entries are no longer bit-identical.

    python benchmarks/merge_drift.py

Why it is not zero: W₀ + ΔW is rounded to the weight's dtype, and so is (W₀ + ΔW) − ΔW. In float32 that is a
change in the last bit of some entries; in bfloat16 (8 bits of mantissa) up to about 0.25 % of the largest
weight (recorded in ``benchmarks/results/merge_drift_cpu.md``). ``unload`` after a merge therefore gives back the pretrained weights only up to this rounding: keep a
copy of the base model (or reload it) when the exact weights matter.
"""

from __future__ import annotations

import copy

import torch

import peft_edu
from peft_edu.assets import load_encoder


def drift(base, dtype: torch.dtype, use_dora: bool) -> tuple[float, float, int, int]:
    model = copy.deepcopy(base).to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                                use_dora=use_dora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    peft_edu.merge(model)
    peft_edu.unmerge(model)
    peft_edu.unload(model)
    after = dict(model.named_parameters())
    adapted = [n for n in before if n.endswith(("query.weight", "value.weight"))]
    worst = max((after[n].float() - before[n].float()).abs().max().item() for n in adapted)
    largest = max(before[n].float().abs().max().item() for n in adapted)
    changed = sum((after[n] != before[n]).sum().item() for n in adapted)
    return worst, worst / largest, changed, sum(before[n].numel() for n in adapted)


def main() -> None:
    torch.manual_seed(0)
    _, base = load_encoder(num_labels=2)
    print("| dtype | method | max abs change of W₀ | relative to max abs W₀ | entries changed |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for use_dora in (False, True):
            worst, relative, changed, total = drift(base, dtype, use_dora)
            print(f"| {str(dtype).removeprefix('torch.')} | {'DoRA' if use_dora else 'LoRA'} | {worst:.2e} | "
                  f"{relative:.2e} | {changed:,} of {total:,} ({100 * changed / total:.1f} %) |")


if __name__ == "__main__":
    main()
