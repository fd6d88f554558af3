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
from dataclasses import dataclass

import torch
from torch import nn

from .config import PeftConfig, require_bools
from .injection import AdapterLayer, find_targets, wrap_targets
from .registry import register_method


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (arXiv 2106.09685): W x + (lora_alpha / r) · B A x, with W frozen.

    r: the rank of the update BA (a positive integer).
    lora_alpha: the numerator of the scaling; ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)``
        with ``use_rslora=True``, arXiv 2312.03732) multiplies BA.
    lora_dropout: dropout applied to x on the LoRA path only, in [0, 1).
    use_dora: weight-decomposed LoRA (arXiv 2402.09353), see ``peft_edu.dora``.
    init_lora_weights: True (A kaiming-uniform, B = 0: ΔW = 0, PEFT's default), "gaussian" (A ~ N(0, 1/r²),
        B = 0) or False (A and B both random: the model does not start as the base model; for tests).
        PEFT's initialisations that also change W₀ (PiSSA, OLoRA, LoftQ, CorDA, EVA) are not implemented.
    bias: only "none" (biases stay frozen), PEFT's default.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True

    peft_type = "LORA"

    def settings_summary(self) -> str:
        return f"r={self.r}" + (", use_dora=True" if self.use_dora else "")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the LoRA rank must be a positive integer (e.g. 4, 8 or 16).")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be a positive number, and finite (PEFT's default is 8).")
        require_bools(self, "use_rslora", "use_dora")
        if not (self.init_lora_weights is True or self.init_lora_weights is False or self.init_lora_weights == "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r}: peft_edu implements True, False and 'gaussian'. PiSSA, "
                "OLoRA, LoftQ, CorDA and EVA also change the base weights, so their A and B mean something else on an "
                "unchanged base; to load such a PEFT adapter, convert it to plain LoRA first with PEFT's "
                "save_pretrained(path_initial_model_for_weight_conversion=...).")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: must be a probability in [0, 1); 0 turns dropout off.")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r}: peft_edu implements only bias='none' (biases stay frozen).")
        if self.target_modules is None:
            raise ValueError(
                'LoraConfig needs target_modules, e.g. ["query", "value"] for BERT or ["q_proj", "v_proj"] for Llama.'
            )


class LoraLinear(AdapterLayer):
    """``nn.Linear`` plus a trainable low-rank update: y = base_layer(x) + s · lora_B(lora_A(dropout(x)))."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True):
        super().__init__(base_layer)
        weight = self.base_weight()
        d_out, d_in = weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, d_out, bias=False, **factory)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r = r
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights is False:  # keep nn.Linear's random A and B (PEFT's option, for tests)
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PyTorch's own nn.Linear init
        nn.init.zeros_(self.lora_B.weight)                                 # ΔW = 0 at the start

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (d_out, d_in): what merging adds to W₀."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # ΔW already lives inside the base weight
            self.refuse_training_while_merged()
            return result
        x = x.to(self.lora_A.weight.dtype)
        return result + (self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))).to(result.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        weight = self.base_weight()
        self.remember_merged_factors()
        self.set_base_weight(weight + self.delta_weight().to(weight.dtype))

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        weight = self.base_weight()
        self.set_base_weight(weight - self.merged_delta_weight().to(weight.dtype))

    def remember_merged_factors(self) -> None:
        """Keep the A and B that merging folds in (r·(d_in + d_out) numbers): unmerge subtracts exactly that ΔW,
        even if A or B were changed while merged (an optimizer step would otherwise leave W₀ corrupted)."""
        self._merged_factors = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())

    def merged_delta_weight(self) -> torch.Tensor:
        A, B = self._merged_factors
        self._merged_factors = None
        return self.scaling * (B @ A)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


# The layer classes of LoRA's variants, by the config field that selects them; DoRA registers itself here
# (dora.py builds on this module, so this module cannot import it).
LAYER_VARIANTS: dict[str, type[LoraLinear]] = {}


def register_lora_variant(config_flag: str, layer_class: type[LoraLinear]) -> None:
    """``LoraConfig(<config_flag>=True)`` wraps layers in ``layer_class`` instead of ``LoraLinear``."""
    if not hasattr(LoraConfig, config_flag):
        raise ValueError(f"LoraConfig has no field {config_flag!r} to select {layer_class.__name__}.")
    LAYER_VARIANTS[config_flag] = layer_class


def lora_layer_class(config: LoraConfig) -> type[LoraLinear]:
    if config.use_dora and "use_dora" not in LAYER_VARIANTS:
        raise RuntimeError("use_dora=True, but DoRA's layer is not registered: import peft_edu (or peft_edu.dora).")
    chosen = [flag for flag in LAYER_VARIANTS if getattr(config, flag)]
    if len(chosen) > 1:
        raise ValueError(f"LoraConfig sets {chosen}; these variants cannot be combined.")
    return LAYER_VARIANTS[chosen[0]] if chosen else LoraLinear


def inject_lora(model: nn.Module, configs: list[LoraConfig], in_union: bool = False) -> list[LoraConfig]:
    """Wrap every ``nn.Linear`` that ``config.target_modules`` selects in a ``LoraLinear`` (or the variant the
    config selects: ``DoraLinear`` with ``use_dora``)."""
    for config in configs:
        layer_class = lora_layer_class(config)
        wrap_targets(model, find_targets(model, config.target_modules), lambda base: layer_class(
            base, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights))
    return configs


register_method(LoraConfig, inject_lora)
