"""A toy method, written the way CONTRIBUTING.md says a method is added: this one file, its last line registers it.

FeatureScale learns one number per output feature of chosen ``nn.Linear`` layers: h = s ⊙ (W x + b), s = 1 at the
start. It exists to prove that the method contract (``peft_edu/registry.py``) is all a method needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peft_edu.config import PeftConfig
from peft_edu.injection import AdapterLayer, find_targets, wrap_targets
from peft_edu.registry import register_method


@dataclass
class FeatureScaleConfig(PeftConfig):
    """target_modules: the nn.Linear layers whose outputs get a learned scale. init_scale: its start value."""

    init_scale: float = 1.0

    peft_type = "FEATURE_SCALE"

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is None:
            raise ValueError("FeatureScaleConfig needs target_modules, e.g. ['query', 'value'].")


class FeatureScaleLinear(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, init_scale: float):
        super().__init__(base_layer)
        weight = self.base_weight()
        self.feature_scale = nn.Parameter(torch.full((weight.shape[0],), float(init_scale), dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else out * self.feature_scale

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.set_base_weight(self.base_weight() * self.feature_scale[:, None])
        if self.base_bias() is not None:
            self.base_bias().mul_(self.feature_scale)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        self.set_base_weight(self.base_weight() / self.feature_scale[:, None])
        if self.base_bias() is not None:
            self.base_bias().div_(self.feature_scale)


def inject_feature_scale(model: nn.Module, configs: list[FeatureScaleConfig], in_union: bool) -> list:
    for config in configs:
        wrap_targets(model, find_targets(model, config.target_modules),
                     lambda base: FeatureScaleLinear(base, config.init_scale))
    return configs


register_method(FeatureScaleConfig, inject_feature_scale)
