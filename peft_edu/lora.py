r"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., arXiv 2106.09685).

A pretrained layer computes h = W₀x + b with W₀ ∈ ℝ^{d_out×d_in}. LoRA freezes W₀ and learns a
low-rank update ΔW = B A with A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r}, r ≪ min(d_in, d_out):

    h = W₀x + b + s · B A dropout(x),        s = α / r   (rsLoRA: s = α / √r, arXiv 2312.03732)

* Trainable parameters per layer: r·(d_in + d_out) instead of d_in·d_out.
* Initialisation (as PEFT): A ~ kaiming-uniform(a=√5), B = 0, so ΔW = 0 and training starts
  exactly from the pretrained model. (Both zero would never train: ∂L/∂A ∝ Bᵀ = 0 and ∂L/∂B ∝ A = 0.)
* Merging folds the update into the weight, W = W₀ + s·BA, so inference costs nothing extra;
  unmerging subtracts it again.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoraConfig
from .injection import AdapterLayer, find_targets, wrap_targets


class LoraLinear(AdapterLayer):
    """``nn.Linear`` plus a trainable low-rank update: y = base_layer(x) + s · lora_B(lora_A(dropout(x)))."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__(base_layer)
        d_out, d_in = base_layer.weight.shape
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, d_out, bias=False, **factory)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r = r
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PyTorch's own nn.Linear init
        nn.init.zeros_(self.lora_B.weight)                             # ΔW = 0 at the start

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (d_out, d_in): what merging adds to W₀."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # ΔW already lives inside base_layer.weight
            return result
        x = x.to(self.lora_A.weight.dtype)
        return result + (self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))).to(result.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        weight = self.base_layer.weight
        weight += self.delta_weight().to(weight.dtype)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        weight = self.base_layer.weight
        weight -= self.delta_weight().to(weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def inject_lora(model: nn.Module, config: LoraConfig) -> None:
    """Wrap every ``nn.Linear`` that ``config.target_modules`` selects in a ``LoraLinear``
    (a ``DoraLinear`` with ``config.use_dora``)."""
    from .dora import DoraLinear  # here, not at the top: dora.py builds on this module

    layer_class = DoraLinear if config.use_dora else LoraLinear
    wrap_targets(model, find_targets(model, config.target_modules), lambda base: layer_class(
        base, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora))
