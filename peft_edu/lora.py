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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PeftConfig, require_bools
from .injection import (AdapterLayer, find_parameter_targets, find_targets, layer_class_for, train_tokens_of,
                        wrap_targets)
from .registry import register_method


# Options of PEFT 0.21.2's LoraConfig that peft_edu does not implement (the other LoRA variants and initialisers).
PEFT_LORA_OPTIONS_NOT_SUPPORTED = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_ga_config", "megatron_config", "megatron_core", "monteclora_config", "peft_version",
    "qalora_group_size", "rank_pattern", "revision", "runtime_config", "use_bdlora", "use_qalora", "velora_config",
})


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (arXiv 2106.09685): W x + (lora_alpha / r) · B A x, with W frozen.

    r: the rank of the update BA (a positive integer).
    lora_alpha: the numerator of the scaling; ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)``
        with ``use_rslora=True``, arXiv 2312.03732) multiplies BA.
    lora_dropout: dropout applied to x on the LoRA path only, in [0, 1).
    use_dora: weight-decomposed LoRA (arXiv 2402.09353), see ``peft_edu.dora``.
    init_lora_weights: True (A kaiming-uniform, B = 0: ΔW = 0, PEFT's default), "gaussian" (A ~ N(0, 1/r²),
        B = 0) or False (A and B both random: the model does not start as the base model; for tests). Two of PEFT's
        initialisations that move part of W₀ into BA (W₀ becomes W₀ − s·B₀A₀): "pissa" (the top-r singular
        directions, arXiv 2404.02948; "pissa_niter_K": a randomized SVD with K iterations) and "olora" (the first r
        columns of a QR decomposition, arXiv 2406.01775), on nn.Linear layers; see ``lora_layers.pissa_init``.
        LoftQ, CorDA, EVA, MiCA... are not supported.
    bias: only "none" (biases stay frozen), PEFT's default.
    lora_bias: B gets a trainable bias of its own (PEFT's option), h = W₀x + b + s·(BAx + b_B); merging adds
        s·b_B to the base layer's bias. Not with use_dora, nor for embeddings (no bias) or nn.MultiheadAttention.
    fan_in_fan_out: PEFT's flag for weights stored (d_in, d_out), as transformers' Conv1D (GPT-2) stores them.
        peft_edu reads each layer's layout from its type (``injection.dense_weight``), so the flag decides nothing;
        the config as applied (what save_adapter writes) says True when a target is a Conv1D, as PEFT sets it
        (PEFT warns and corrects a wrong value per layer).
    target_parameters: bare 2-D parameters to adapt, by full name (``"experts.gate_up"``; PEFT's rule: equal to an
        entry or ending with "." + entry), for modules that multiply by a parameter themselves; see
        ``lora_layers.LoraParameter``. With it, target_modules may be None; not with lora_dropout, lora_bias, use_dora.
    trainable_token_indices: rows of an embedding table trained as such next to LoRA (PEFT's trainable tokens,
        ``injection.TrainableTokens``): a list of token ids (the input embeddings) or {embedding name: token ids}.

    Besides nn.Linear, LoRA adapts transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention
    (``peft_edu.lora_layers``), DoRA all but the last.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    peft_type = "LORA"

    def __new__(cls, *args, **kwargs):
        # An option of PEFT's LoraConfig that peft_edu lacks is refused by name here, before the dataclass's own
        # "unexpected keyword argument" (a PEFT line such as kasa_config=KasaConfig() should say what is missing).
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            name = unknown[0]
            if name in PEFT_LORA_OPTIONS_NOT_SUPPORTED:
                raise TypeError(f"{name}={kwargs[name]!r}: PEFT's LoraConfig option {name!r} is not supported by "
                                f"peft_edu. Its LoraConfig has {sorted(f.name for f in dataclasses.fields(cls))}.")
            raise TypeError(f"LoraConfig has no option {name!r} (neither peft_edu's nor PEFT's); its options are "
                            f"{sorted(f.name for f in dataclasses.fields(cls))}.")
        return super().__new__(cls)

    def settings_summary(self) -> str:
        return f"r={self.r}" + (", use_dora=True" if self.use_dora else "")

    def as_loaded(self) -> "LoraConfig":
        """PiSSA's and OLoRA's adapters load by deriving W₀ − s·B₀A₀ from the base model again, as PEFT loads them: the
        decompositions are deterministic, a randomized SVD (pissa_niter_K) is not, so that adapter is refused."""
        if _pissa_iterations(self.init_lora_weights):
            raise ValueError(
                f"An adapter trained with init_lora_weights={self.init_lora_weights!r} cannot be loaded exactly: it "
                "belongs to the base model minus a randomized SVD's top part, which cannot be computed again. Convert "
                "it to plain LoRA where it was trained (PEFT: save_pretrained(..., "
                "path_initial_model_for_weight_conversion=<the adapter saved before training>)), or train with 'pissa'.")
        return self

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the LoRA rank must be a positive integer (e.g. 4, 8 or 16).")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be a positive number, and finite (PEFT's default is 8).")
        require_bools(self, "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True with use_dora=True is not supported: DoRA would rescale B's bias by the "
                             "magnitude too, and peft_edu implements lora_bias for plain LoRA only. Use one of the two.")
        if not (self.init_lora_weights is True or self.init_lora_weights is False
                or self.init_lora_weights in ("gaussian", "pissa", "olora") or _pissa_iterations(self.init_lora_weights)):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported: peft_edu implements True, False, "
                "'gaussian', 'pissa', 'pissa_niter_K' and 'olora'. LoftQ, CorDA and EVA also change the base "
                "weights, so their A and B mean something else on an unchanged base; to load such a PEFT adapter, "
                "convert it to plain LoRA first with PEFT's "
                "save_pretrained(path_initial_model_for_weight_conversion=...).")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: must be a probability in [0, 1); 0 turns dropout off.")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r}: peft_edu implements only bias='none' (biases stay frozen).")
        if self.target_parameters is not None:
            if (not isinstance(self.target_parameters, (list, tuple)) or not self.target_parameters
                    or not all(isinstance(t, str) and t for t in self.target_parameters)):
                raise ValueError(f"target_parameters={self.target_parameters!r}: give a non-empty list of parameter "
                                 'names, e.g. ["mlp.experts.gate_up_proj"].')
            self.target_parameters = list(self.target_parameters)
            refused = [f"{name}={getattr(self, name)!r}" for name in ("lora_dropout", "lora_bias", "use_dora")
                       if getattr(self, name)]
            if refused:
                raise ValueError(f"target_parameters with {refused[0]} is not supported (nor in PEFT): the update is "
                                 "added to the parameter, so there is no input to drop, no output for a bias, and no "
                                 "layer for DoRA's magnitude.")
        tokens = self.trainable_token_indices
        if tokens is not None and not (
                (isinstance(tokens, list) and tokens) or
                (isinstance(tokens, dict) and tokens and all(isinstance(k, str) and isinstance(v, list) and v
                                                             for k, v in tokens.items()))):
            raise ValueError(f"trainable_token_indices={tokens!r}: a non-empty list of token ids, or a dict "
                             "{embedding name: [token ids]}, e.g. {'embed_tokens': [0, 5]}.")
        if self.target_modules is None and self.target_parameters is None:
            raise ValueError(
                'LoraConfig needs target_modules, e.g. ["query", "value"] for BERT or ["q_proj", "v_proj"] for Llama '
                "(or target_parameters)."
            )


class LoraLinear(AdapterLayer):
    """``nn.Linear`` plus a trainable low-rank update: y = base_layer(x) + s · lora_B(lora_A(dropout(x))).

    The other layer types (``peft_edu.lora_layers``) are small subclasses: they build A and B in the layer's own form
    (``create_factors``), say which matrices they are (``lora_factors``) and, where needed, how the update meets the
    input (``forward``); merging works on every layer's dense (d_out, d_in) weight.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, lora_bias: bool = False):
        super().__init__(base_layer)
        self.r = r
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.create_factors(r, lora_bias)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters(init_lora_weights)

    def create_factors(self, r: int, lora_bias: bool) -> None:
        """A (r × d_in) and B (d_out × r) as ``nn.Linear`` layers, B with a bias if ``lora_bias``."""
        weight = self.base_weight()
        d_out, d_in = weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, d_out, bias=lora_bias, **factory)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if isinstance(init_lora_weights, str) and init_lora_weights.split("_niter_")[0] in BASE_CHANGING_INITS:
            BASE_CHANGING_INITS[init_lora_weights.split("_niter_")[0]](self, init_lora_weights)
        else:
            reset_factors(self.lora_A, self.lora_B, self.r, init_lora_weights)

    # PiSSA and OLoRA start from A₀, B₀ taken out of W₀ (W₀ ← W₀ − s·B₀A₀): taking the adapter out (unload,
    # disable_adapter) puts s·B₀A₀ back, so the model is the pretrained one again (PEFT leaves W₀ − s·B₀A₀).
    initial_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def remove(self, model: nn.Module, name: str) -> None:
        super().remove(model, name)
        self._move_initial_update(+1)

    def put_back(self, model: nn.Module, name: str) -> None:
        self._move_initial_update(-1)
        super().put_back(model, name)

    @torch.no_grad()
    def _move_initial_update(self, sign: int) -> None:
        if self.initial_factors is not None:
            A, B = self.initial_factors
            weight = self.base_weight()
            self.set_base_weight(weight + (sign * self.scaling * (B @ A)).to(weight.dtype))

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r × d_in) and B (d_out × r) as matrices."""
        return self.lora_A.weight, self.lora_B.weight

    def lora_B_bias(self) -> torch.Tensor | None:
        """B's own bias (``lora_bias=True``), or None."""
        return self.lora_B.bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (d_out, d_in): what merging adds to W₀."""
        A, B = self.lora_factors()
        return self.scaling * (B @ A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # ΔW already lives inside the base weight
            self.refuse_training_while_merged()
            return result
        x = x.to(self.lora_A.weight.dtype)
        return result + (self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))).to(result.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        weight, bias, lora_bias = self.base_weight(), self.base_bias(), self.lora_B_bias()
        if lora_bias is not None and bias is None:
            raise ValueError("lora_bias=True, but the base layer has no bias to fold B's bias into, so this layer cannot "
                             "be merged; keep the adapter unmerged.")
        self.remember_merged_factors()
        self.set_base_weight(weight + self.delta_weight().to(weight.dtype))
        if lora_bias is not None:
            bias.add_(self._merged_bias.to(bias.dtype))

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        weight, bias = self.base_weight(), self.base_bias()
        if self._merged_bias is not None:
            bias.sub_(self._merged_bias.to(bias.dtype))
        self.set_base_weight(weight - self.merged_delta_weight().to(weight.dtype))

    def remember_merged_factors(self) -> None:
        """Keep the A and B that merging folds in (r·(d_in + d_out) numbers), and s·b_B: unmerge subtracts exactly
        that ΔW, even if A or B were changed while merged (an optimizer step would otherwise leave W₀ corrupted)."""
        self._merged_factors = tuple(factor.detach().clone() for factor in self.lora_factors())
        lora_bias = self.lora_B_bias()
        self._merged_bias = None if lora_bias is None else self.scaling * lora_bias.detach().clone()

    def merged_delta_weight(self) -> torch.Tensor:
        A, B = self._merged_factors
        self._merged_factors = None
        return self.scaling * (B @ A)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def _pissa_iterations(init_lora_weights) -> int | None:
    """K of "pissa_niter_K" (a positive integer), else None."""
    prefix, _, count = str(init_lora_weights).partition("_niter_")
    return int(count) if prefix == "pissa" and count.isdigit() and int(count) > 0 else None


# Initialisations that change W₀ too: name -> init(layer, init_lora_weights), which sets A and B, writes W₀ − s·BA
# into the base layer and keeps (A₀, B₀) in layer.initial_factors. peft_edu.lora_layers registers PiSSA and OLoRA.
BASE_CHANGING_INITS: dict[str, Callable] = {}


def reset_factors(lora_A: nn.Module, lora_B: nn.Module, r: int, init_lora_weights: bool | str) -> None:
    """PEFT's initialisations of a pair of factors (nn.Linear or convolutions): A random, B = 0, so ΔW = 0."""
    if init_lora_weights is False:  # keep the layers' own random A and B (PEFT's option, for tests)
        return
    if init_lora_weights == "gaussian":
        nn.init.normal_(lora_A.weight, std=1 / r)
    else:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))  # PyTorch's own nn.Linear init
    nn.init.zeros_(lora_B.weight)                                 # ΔW = 0 at the start
    if lora_B.bias is not None:
        nn.init.zeros_(lora_B.bias)


# The LoRA layer class for each (variant, base layer type): the variant is the config field that selects it (None:
# plain LoRA); nn.Parameter stands for a bare parameter (target_parameters). DoRA and the other layer types register
# themselves (they build on this module, which cannot import them).
LAYER_VARIANTS: dict[tuple[str | None, type], type[LoraLinear]] = {(None, nn.Linear): LoraLinear}


def register_lora_variant(config_flag: str | None, layer_class: type[LoraLinear], base_type: type = nn.Linear) -> None:
    """``LoraConfig(<config_flag>=True)`` wraps ``base_type`` layers in ``layer_class`` (``config_flag=None``: LoRA
    itself on a new layer type)."""
    if config_flag is not None and not hasattr(LoraConfig, config_flag):
        raise ValueError(f"LoraConfig has no field {config_flag!r} to select {layer_class.__name__}.")
    LAYER_VARIANTS[(config_flag, base_type)] = layer_class


def lora_layer_class(config: LoraConfig, base_layer: nn.Module) -> type[LoraLinear]:
    """The class that wraps ``base_layer`` for ``config``; the error names the layer type and where it is supported."""
    flags = {flag for flag, _ in LAYER_VARIANTS if flag is not None}
    if config.use_dora and "use_dora" not in flags:
        raise RuntimeError("use_dora=True, but DoRA's layer is not registered: import peft_edu (or peft_edu.dora).")
    chosen = sorted(flag for flag in flags if getattr(config, flag))
    if len(chosen) > 1:
        raise ValueError(f"LoraConfig sets {chosen}; these variants cannot be combined.")
    variant = chosen[0] if chosen else None
    classes = {base: cls for (flag, base), cls in LAYER_VARIANTS.items() if flag == variant}
    return layer_class_for(classes, base_layer, f"LoRA with {variant}=True" if variant else "LoRA")


def inject_lora(model: nn.Module, configs: list[LoraConfig], in_union: bool = False) -> list[LoraConfig]:
    """Wrap every layer that ``config.target_modules`` selects in the LoRA layer class of its type (``LoraLinear``
    for nn.Linear, ``peft_edu.lora_layers`` for the others; DoRA's with ``use_dora``). Returns the configs as applied:
    ``fan_in_fan_out`` says whether a target stores its weight transposed (Conv1D), as PEFT sets it."""
    applied = []
    layer_types = tuple({base: None for _, base in LAYER_VARIANTS if base is not nn.Parameter})
    for config in configs:
        settings = dict(r=config.r, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora,
                        init_lora_weights=config.init_lora_weights)
        names = [] if config.target_modules is None else find_targets(model, config.target_modules, kind=layer_types)
        wrap_targets(model, names, lambda base: lora_layer_class(config, base)(
            base, lora_dropout=config.lora_dropout, lora_bias=config.lora_bias, **settings))
        # then bare parameters, as PEFT (so that both draw the same initial factors), then trained rows
        for module_name, parameter_name in find_parameter_targets(model, config.target_parameters or []):
            wrap_targets(model, [module_name], lambda base: LAYER_VARIANTS[(None, nn.Parameter)](
                base, parameter_name, **settings))
        if config.trainable_token_indices:
            train_tokens_of(model, config.trainable_token_indices)
        transposed = any(isinstance(model.get_submodule(name).base_layer, Conv1D) for name in names)
        applied.append(dataclasses.replace(config, fan_in_fan_out=transposed))
    return applied


register_method(LoraConfig, inject_lora)
