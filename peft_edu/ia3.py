r"""(IA)³: rescale inner activations with learned vectors (Liu et al., arXiv 2205.05638, "T-Few").

"Infused Adapter by Inhibiting and Amplifying Inner Activations" adds no layer and no matrix: each
adapted ``nn.Linear`` (h = W x + b, W ∈ ℝ^{d_out×d_in}; also GPT-2's ``Conv1D``, and ``nn.Conv2d/3d`` per
channel, see ``lora_layers.IA3Conv``) gets one vector l, initialised to ones, that
multiplies an activation element-wise. Where it multiplies depends on the layer's role:

* attention keys and values (and any target not listed in ``feedforward_modules``) scale the output:

      h = l ⊙ (W x + b),        l ∈ ℝ^{d_out}, stored with shape (d_out, 1)

* feed-forward layers (``feedforward_modules``: BERT ``output.dense``, Llama ``down_proj``) scale the
  input, which for the FFN's second projection is the FFN's inner activation:

      h = W (l ⊙ x) + b,        l ∈ ℝ^{d_in}, stored with shape (1, d_in)

  (the bias is not scaled here). In the paper: l_k, l_v rescale keys and values inside attention,
  l_ff rescales γ(W₁x) before W₂.

* Trainable parameters: d_out per attention layer, d_in per feed-forward layer, e.g. with BERT's
  defaults 384 (key) + 384 (value) + 384 (attention.output.dense) + 1536 (output.dense) = 2,688 per
  MiniLM layer, 16,128 in all (0.07% of MiniLM; the paper reports about 0.01% for T0-3B).
* Initialisation: l = 1, so the adapted model *is* the base model, bit for bit (× 1.0 is exact).
  ``init_ia3_weights=False`` keeps PEFT's N(0, 1) draw instead (PEFT always draws it, then
  overwrites it with ones; we draw too, so the random stream stays in step with PEFT's).
* Merging folds l into the weight, as PEFT does: output scaling multiplies the rows of W *and the
  bias* (W ← diag(l) W, b ← l ⊙ b); input scaling multiplies the columns of W (W ← W diag(l)) and
  leaves b alone. Unmerging divides by (l + 1e-8) exactly like PEFT, so it is exact only up to
  rounding and cannot bring back a row or column whose l was 0 (PEFT warns "Unmerge result can be
  inaccurate for (IA)^3").

Which targets count as feed-forward follows PEFT's rule, which differs from the target rule: a list
entry selects every *targeted* module whose full name ends with it (no dot boundary needed); a string
is a regex that must match the whole name. Note that PEFT's BERT default ``output.dense`` selects
both ``layer.N.output.dense`` (the FFN's down projection, input = GELU activation, 4·d wide) and
``layer.N.attention.output.dense`` (input = the attention context). The latter is redundant with the
value vector: attention mixes positions, not features, so scaling feature j of the context equals
scaling feature j of every value vector.

``target_modules=None`` and ``feedforward_modules=None`` take PEFT's defaults for the model's
``config.model_type`` (``DEFAULT_TARGET_MODULES`` below, copied from PEFT's ``utils/constants.py`` for
the course's architectures).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PeftConfig
from .injection import AdapterLayer, find_targets, layer_class_for, replace_module
from .registry import register_method


@dataclass
class IA3Config(PeftConfig):
    """(IA)³ (arXiv 2205.05638): vectors, initialised to ones, rescale activations; see ``peft_edu.ia3``.

    target_modules: the nn.Linear layers that get a vector. None takes PEFT's defaults for the model's
        ``config.model_type`` (BERT: key, value, output.dense; Llama: k_proj, v_proj, down_proj).
    feedforward_modules: the targets whose *input* is scaled, h = W (l ⊙ x) + b; the other targets
        scale their output, h = l ⊙ (W x + b). A list must be a subset of target_modules (PEFT's
        rule) and an entry selects each targeted module whose name ends with it; a string is a
        regex matched against the whole name. None takes PEFT's defaults for the model type; []: none.
    init_ia3_weights: True starts from ones (the base model exactly); False keeps N(0, 1) as PEFT does.
    fan_in_fan_out: PEFT's flag for transformers' Conv1D (weight stored (d_in, d_out)). peft_edu reads the layout
        from each layer's type, so it decides nothing; the config as applied says True when a target is a Conv1D,
        as PEFT sets it.

    IA³ adapts nn.Linear, transformers' Conv1D and nn.Conv2d/3d (``peft_edu.lora_layers``), the layers PEFT's IA³ adapts.
    """

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    peft_type = "IA3"

    def settings_summary(self) -> str:
        return f"feedforward_modules={self.feedforward_modules!r}"

    def __post_init__(self):
        super().__post_init__()
        ff = self.feedforward_modules
        if isinstance(ff, (list, tuple, set)):
            self.feedforward_modules = ff = list(ff)
            if not all(isinstance(f, str) and f for f in ff):
                raise ValueError(f"feedforward_modules={ff!r}: give a list of module names "
                                 '(e.g. ["output.dense"] or ["down_proj"]), [] for none, or one regular expression.')
        elif isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as error:
                raise ValueError(f"feedforward_modules={ff!r} is read as a regular expression and is not a valid one "
                                 f"({error}); give a list of names such as ['down_proj'], or a valid regex.") from None
        elif ff is not None:
            raise TypeError(f"feedforward_modules must be a list of names or a regex string, not {type(ff).__name__}.")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"fan_in_fan_out={self.fan_in_fan_out!r}: must be True or False.")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights={self.init_ia3_weights!r}: must be True (ones) or False (random).")
        # PEFT's rule, checked when both are lists: a feed-forward module must also be a target.
        if isinstance(ff, list) and isinstance(self.target_modules, list):
            extra = [f for f in ff if f not in self.target_modules]
            if extra:
                raise ValueError(
                    f"feedforward_modules entries {extra} are not in target_modules {self.target_modules}: "
                    f"feedforward_modules must be a subset of target_modules (PEFT's rule); add {extra} to target_modules."
                )

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        if isinstance(d["feedforward_modules"], list):
            d["feedforward_modules"] = sorted(d["feedforward_modules"])
        return d

# PEFT's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING, for the course's model types.
DEFAULT_TARGET_MODULES = {
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "t5": ["k", "v", "wo"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "phi": ["q_proj", "v_proj", "fc2"],
}
DEFAULT_FEEDFORWARD_MODULES = {
    "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "t5": ["wo"],
    "bart": ["fc2"],
    "opt": ["fc2"],
    "phi": ["fc2"],
}

_USUAL = ("usually the attention key and value projections plus the FFN's second projection, e.g. BERT: "
          "target_modules=['key', 'value', 'output.dense'], feedforward_modules=['output.dense']; Llama: "
          "target_modules=['k_proj', 'v_proj', 'down_proj'], feedforward_modules=['down_proj']")


class IA3Linear(AdapterLayer):
    """``nn.Linear`` times a learned vector: ``base_layer(x) * l`` or, feed-forward, ``base_layer(x * l)``.

    The vector is the parameter ``ia3_l`` (PEFT's file key ``<module>.ia3_l``), shape ``(d_out, 1)``
    or, with ``is_feedforward``, ``(1, d_in)`` — PEFT's shapes, so files map one to one.
    """

    def __init__(self, base_layer: nn.Linear, is_feedforward: bool, init_ia3_weights: bool = True):
        super().__init__(base_layer)
        weight = self.base_weight()
        self.is_feedforward = is_feedforward
        shape = self.vector_shape()
        vector = torch.randn(shape)  # drawn even when overwritten, as PEFT does (same random stream)
        if init_ia3_weights:
            vector = torch.ones(shape)
        self.ia3_l = nn.Parameter(vector.to(device=weight.device, dtype=weight.dtype))

    # How l meets the layer; a convolution (``lora_layers.IA3Conv``) answers these three differently.
    def vector_shape(self) -> tuple[int, ...]:
        d_out, d_in = self.base_weight().shape
        return (1, d_in) if self.is_feedforward else (d_out, 1)

    def activation_scale(self) -> torch.Tensor:
        """l shaped to multiply the activation it scales (features last)."""
        return self.ia3_l.flatten()

    def weight_scale(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` (l) shaped to multiply the dense weight: (d_out, 1) scales rows, (1, d_in) columns."""
        return vector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # l already lives inside the base weight (and bias)
            self.refuse_training_while_merged()
            return self.base_layer(x)
        scale = self.activation_scale()
        if self.is_feedforward:  # h = W (l ⊙ x) + b
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)  # h = l ⊙ (W x + b)
        return (result * scale).to(result.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        weight, bias = self.base_weight(), self.base_bias()
        self._merged_l = self.ia3_l.detach().clone()  # what unmerge divides by, even if l changes while merged
        self.set_base_weight(torch.mul(weight, self.weight_scale(self.ia3_l)))
        if not self.is_feedforward and bias is not None:
            bias.copy_(torch.mul(bias, self.ia3_l.reshape(bias.shape)))

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        weight, bias, l = self.base_weight(), self.base_bias(), self._merged_l
        self.set_base_weight(torch.div(weight, self.weight_scale(l) + 1e-8))  # PEFT's guard against l = 0
        if not self.is_feedforward and bias is not None:
            bias.copy_(torch.div(bias, l.reshape(bias.shape) + 1e-8))
        self._merged_l = None

    def extra_repr(self) -> str:
        side = "input (feed-forward)" if self.is_feedforward else "output"
        return f"scales={side}, shape={tuple(self.ia3_l.shape)}, merged={self.merged}"


# The IA³ layer class for each base layer type; peft_edu.lora_layers registers the convolutions.
LAYER_CLASSES: dict[type, type[IA3Linear]] = {nn.Linear: IA3Linear, Conv1D: IA3Linear}


def is_feedforward(feedforward_modules: list[str] | str, name: str) -> bool:
    """PEFT's feed-forward rule: a regex must match the whole name, a list entry only its end."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


def resolve_config(model: nn.Module, config: IA3Config) -> IA3Config:
    """A copy of ``config`` with PEFT's per-architecture defaults filled in, checked against ``model``.

    Unlike PEFT, the user's config object is not changed, and every feed-forward entry must select one
    of the targeted modules.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is None:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"IA3Config(target_modules=None) takes PEFT's defaults for the model's config.model_type, but "
                f"{type(model).__name__} has model_type={model_type!r}, which has none "
                f"(known: {sorted(DEFAULT_TARGET_MODULES)}). Name the layers to rescale, {_USUAL}."
            )
        targets = list(DEFAULT_TARGET_MODULES[model_type])
    names = find_targets(model, targets, kind=tuple(LAYER_CLASSES))  # strict: every entry matches, a supported type
    if feedforward is None:
        if model_type not in DEFAULT_FEEDFORWARD_MODULES:
            raise ValueError(
                f"IA3Config(feedforward_modules=None) takes PEFT's defaults for the model's config.model_type, but "
                f"{type(model).__name__} has model_type={model_type!r}, which has none. Say which targets are "
                f"feed-forward (their input is scaled), e.g. feedforward_modules=['down_proj'], or pass "
                f"feedforward_modules=[] if none is."
            )
        defaults = DEFAULT_FEEDFORWARD_MODULES[model_type]
        # Keep the defaults that select one of the targets; the others change nothing.
        feedforward = [entry for entry in defaults if any(is_feedforward([entry], n) for n in names)]
        if isinstance(targets, list) and not set(feedforward) <= set(targets):
            selected = [n for n in names if is_feedforward(feedforward, n)]
            raise ValueError(
                f"target_modules={targets!r} with PEFT's default feedforward_modules for {model_type} "
                f"({defaults!r}) would treat {selected[:3]} as feed-forward although {feedforward!r} is not a "
                f"target_modules entry; PEFT does this silently and then cannot load its own adapter_config.json "
                f"(feedforward_modules must be a subset of target_modules). Pass feedforward_modules explicitly: "
                f"add {feedforward!r} to target_modules and feedforward_modules, or feedforward_modules=[]."
            )
    elif isinstance(feedforward, str):
        if not any(is_feedforward(feedforward, n) for n in names):
            raise ValueError(
                f"feedforward_modules={feedforward!r} matches none of the targeted modules (a regex must match the "
                f"whole name), e.g. {names[:3]}."
            )
    else:
        unmatched = [entry for entry in feedforward if not any(is_feedforward([entry], n) for n in names)]
        if unmatched:
            raise ValueError(
                f"feedforward_modules entry {unmatched[0]!r} matches none of the targeted modules, whose names "
                f"look like {names[:3]}. A feed-forward module must also be a target."
            )
    transposed = any(isinstance(model.get_submodule(name), Conv1D) for name in names)
    return dataclasses.replace(config, target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=transposed)


def inject_ia3(model: nn.Module, configs: list[IA3Config], in_union: bool = False) -> list[IA3Config]:
    """Wrap every layer that ``config.target_modules`` selects in the IA³ layer of its type (``IA3Linear``).

    Returns the resolved config (PEFT's defaults filled in), which ``save_adapter`` writes, so that
    ``adapter_config.json`` holds the lists that were used, as PEFT's does.
    """
    resolved_configs = []
    for config in configs:
        resolved = resolve_config(model, config)
        # in model order, as PEFT: with init_ia3_weights=False both draw the same vectors
        for name in find_targets(model, resolved.target_modules, kind=tuple(LAYER_CLASSES)):
            base = model.get_submodule(name)
            replace_module(model, name, layer_class_for(LAYER_CLASSES, base, "IA³")(
                base, is_feedforward=is_feedforward(resolved.feedforward_modules, name),
                init_ia3_weights=resolved.init_ia3_weights))
        resolved_configs.append(resolved)
    return resolved_configs


register_method(IA3Config, inject_ia3)
