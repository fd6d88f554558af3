r"""Bottleneck adapters: a small two-layer network added to every transformer layer.

Houlsby et al. (arXiv 1902.00751) freeze the pretrained model and insert, after a sublayer, a network that
projects the hidden state h ∈ ℝ^d down to m ≪ d units, applies a non-linearity f and projects back up:

    A(z) = s · (W_up f(W_down z + b_down) + b_up),     W_down ∈ ℝ^{m×d},  W_up ∈ ℝ^{d×m},
                                                      m = int(d // reduction_factor)  (at least 1)
    serial:    h ← h + A(h)            the adapter sits *on* the path, with its own skip connection
    parallel:  h ← h + A(x)            the adapter reads the sublayer's input x, next to the sublayer

(The source article writes "LayerNorm → FFN(DownProj(Activation(UpProj(DownProj(x))))) + x"; there is one
down-projection, one non-linearity and one up-projection, plus the skip connection.)

* Trainable parameters per adapter: 2·d·m + m + d (weights and biases of both projections).
* Initialisation, as AdapterHub: ``init_weights="bert"`` draws both weights from N(0, 0.02²) with zero biases,
  so the adapter starts *near* the identity; ``"mam_adapter"`` (the parallel preset) draws W_down
  kaiming-uniform and sets W_up = 0, b_up = 0, so A = 0 and the model starts exactly as the base model.
* No merging: f sits between W_down and W_up, so h + A(h) is not a linear map of h and no weight matrix of
  the frozen model can absorb it (LoRA can merge because BA has nothing in between). An adapter costs two
  small matrix products per sublayer at inference; ``unload`` gives the base model back.

Where the adapter goes, in words (AdapterHub's ``adapters`` 1.3.0, which this module reproduces exactly).
Write x for a sublayer's input (the residual stream), h for the sublayer's output (BERT: after its output
``dense`` and dropout; Llama: the attention's ``o_proj`` output or the MLP's output).

    BERT, post-norm (a layer computes LN(h + x) twice: attention, then FFN):
      DoubleSeqBnConfig (Houlsby)   attention and FFN   LN(h + A(h) + x)
      SeqBnConfig (Pfeiffer)        FFN only            LN(h + A(LN(h + x)) + x)
                                    (the adapter reads the sublayer's normalised output, its skip connection
                                    carries h, and the *same* pretrained LayerNorm is applied once more)
      ParBnConfig (He et al.)       FFN only            LN(h + A(x) + x)
                                    (x is the FFN's input, i.e. the attention block's output)

    Llama, pre-norm (a layer computes x + h with h = sublayer(RMSNorm(x)); AdapterHub passes no norm):
      DoubleSeqBnConfig             attention and MLP   x + h + A(h)
      SeqBnConfig                   MLP only            x + h + A(h + x)   (the updated residual stream)
      ParBnConfig                   MLP only            x + h + A(x)       (x *before* the RMSNorm: not the
                                                                          normalised input the MLP reads)

So the adapter always sits *before* the pretrained LayerNorm of a post-norm layer (which then normalises
h + A(·) + x), and inside the residual branch of a pre-norm layer.

AdapterHub's other switches change these formulas in the places ``_serial`` and ``_parallel`` show: ``ln_before`` /
``ln_after`` add a trainable LayerNorm on the adapter's input / output; ``residual_before_ln`` says what the serial
adapter's skip connection carries in place of h (False: its own input; "post_add": h + x); with ``ln_after``,
``adapter_residual_before_ln`` adds that skip connection before the new LayerNorm; ``original_ln_after=False`` leaves
out the final "+ x" and pretrained LayerNorm (post-norm models only).

How it gets into the model (see ``injection.py``): each adapter is a ``BottleneckAdapter`` wrapping the module
whose output it changes. In BERT that is the sublayer's output module (``attention.output``, a
``BertSelfOutput``, and ``output``, a ``BertOutput``): both get (h_in, x), so the wrapper reruns their ``dense``,
``dropout`` and ``LayerNorm`` with the adapter in between. In Llama it is ``self_attn`` or ``mlp``, whose
output the decoder layer adds to x; when the adapter also needs x (Pfeiffer, parallel), a ``ResidualTap``
wraps the norm in front of the sublayer (``input_layernorm``, ``post_attention_layernorm``), whose input *is* x,
and hands it over. Both wrappers keep the original module as ``base_layer``: ``unload`` restores the model.

Mixed adapters: a ``BnConfig`` has ``leave_out`` and per-layer ``reduction_factor``s; a ``ConfigUnion`` of
bottleneck configs gives each layer and location its own kind (one member per location). A union may also hold
one ``PrefixTuningConfig`` (``prefix_tuning.py`` adds it): He et al.'s mix-and-match, ``MAMConfig``, is a prefix in
every attention layer plus a parallel adapter next to every FFN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ConfigUnion, PeftConfig, require_finite
from .injection import AdapterLayer, TrainedCopy, replace_module
from .prefix_tuning import PrefixTuningConfig
from .registry import register_method

LOCATIONS = ("mh_adapter", "output_adapter")  # AdapterHub's location keys: after attention, after the FFN

MERGE_ERROR = (
    "Bottleneck adapters cannot be merged into the frozen weights: the adapter adds s·W_up f(W_down z), and the "
    "non-linearity f between the two projections makes it a non-linear function of the hidden state, which no "
    "change of a weight matrix can reproduce (LoRA's B·A has nothing between B and A, which is why it merges). "
    "Keep the adapter at inference, or call peft_edu.unload(model) to get the base model back."
)


# --- the configs (AdapterHub's, with its field names and defaults) ---------------------------------------
BN_INITS = ("bert", "mam_adapter", "houlsby")


@dataclass(kw_only=True)
class BnConfig(PeftConfig):
    """Bottleneck adapters, AdapterHub's ``BnConfig`` with its field names and defaults; see ``peft_edu.bottleneck``.

    Use a preset (``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``) or give the four required fields.

    mh_adapter / output_adapter: add an adapter at the attention sublayer's output / the FFN's output.
    reduction_factor: the bottleneck has ``int(hidden_size // reduction_factor)`` units (at least 1). A dict gives
        per-layer sizes, AdapterHub's ``{"0": 8, "default": 16}`` (int keys are turned into strings).
    non_linearity: the activation between the projections (a name transformers knows: "relu", "swish", "gelu"...).
    original_ln_before: Pfeiffer's placement: the adapter reads LayerNorm(h + x), the sublayer's output after the
        residual (and, in post-norm models, after the pretrained LayerNorm) instead of h.
    original_ln_after: after the adapter, add x and apply the pretrained LayerNorm (post-norm) as the layer did
        without an adapter; False leaves both out (pre-norm models: not implemented, it would drop x altogether).
    residual_before_ln: what the serial adapter's own skip connection carries: True h, False the adapter's input
        (LayerNorm(h + x) with original_ln_before), "post_add" h + x (needs original_ln_before, post-norm only).
    ln_before / ln_after: a new trainable LayerNorm on the adapter's input / on its output.
    adapter_residual_before_ln: with ln_after, add the skip connection before that LayerNorm instead of after.
    is_parallel: the adapter reads the sublayer's input x and its output is added next to the sublayer's (He et al.).
    scaling: a number s that multiplies the adapter's output (He et al. use 4.0).
    init_weights: "bert" (both projections ~ N(0, 0.02²), biases 0), "houlsby" (both ~ N(0, 0.01²) truncated at
        ±0.02, biases 0) or "mam_adapter" (down projection kaiming-uniform, up projection 0: the adapter starts as
        the identity). init_weights_seed: reseed before each adapter module's init, as AdapterHub does (0 or None:
        no reseeding).
    leave_out: layer indices (from 0) that get no adapter. dropout: on the adapter's output.
    target_modules must stay None: the placement comes from mh_adapter / output_adapter.
    """

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | dict
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float = 1.0
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    leave_out: list = field(default_factory=list)
    dropout: float = 0.0

    peft_type = "BOTTLENECK"

    def settings_summary(self) -> str:
        return f"reduction_factor={self.reduction_factor!r}"

    def check_union_member(self, union) -> None:
        if self.task_type is not None or self.modules_to_save is not None:
            raise ValueError("Give task_type and modules_to_save to the ConfigUnion, not to its members.")

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None:
            raise ValueError(f"target_modules={self.target_modules!r}: bottleneck adapters are placed by mh_adapter "
                             "(after attention) and output_adapter (after the FFN), not by target_modules; leave it None.")
        for name in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before", "ln_after",
                     "adapter_residual_before_ln", "is_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False.")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("mh_adapter=False and output_adapter=False: this config adds no adapter anywhere.")
        if self.residual_before_ln not in (True, False, "post_add") or not isinstance(self.residual_before_ln, (bool, str)):
            raise ValueError(f"residual_before_ln={self.residual_before_ln!r}: True, False or 'post_add'.")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("residual_before_ln='post_add' takes h + x, which only exists with original_ln_before=True "
                             "(AdapterHub fails on this combination too).")
        rf = self.reduction_factor
        if isinstance(rf, dict):
            self.reduction_factor = rf = {str(k): v for k, v in rf.items()}
            bad = [k for k in rf if k != "default" and not k.isdigit()]
            if bad or not rf:
                raise ValueError(f"reduction_factor={rf!r}: the keys of a per-layer mapping are layer indices and "
                                 "'default', e.g. {'0': 8, 'default': 16}.")
            values = list(rf.values())
        else:
            values = [rf]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"reduction_factor={rf!r}: must be a positive number (hidden_size // reduction_factor "
                             "units) or a mapping from layer index / 'default' to positive numbers.")
        if not isinstance(self.non_linearity, str):
            raise ValueError(f"non_linearity={self.non_linearity!r}: give an activation name such as 'relu' or 'swish'.")
        from transformers.activations import ACT2FN  # transformers' names, as AdapterHub uses them

        if self.non_linearity.lower() not in ACT2FN and self.non_linearity.lower() != "leakyrelu":
            raise ValueError(f"non_linearity={self.non_linearity!r} is not an activation transformers knows "
                             f"(e.g. {sorted(ACT2FN)[:12]}...).")
        if self.init_weights not in BN_INITS:
            raise ValueError(f"init_weights={self.init_weights!r}: one of {BN_INITS}, as in AdapterHub.")
        if self.init_weights_seed is not None and (isinstance(self.init_weights_seed, bool)
                                                   or not isinstance(self.init_weights_seed, int)):
            raise ValueError(f"init_weights_seed={self.init_weights_seed!r}: an integer or None.")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling={self.scaling!r}: peft_edu implements a fixed number only (AdapterHub's "
                             "'learned' and 'channel' scalings are not implemented).")
        require_finite("scaling", self.scaling)
        self.scaling = float(self.scaling)
        if not isinstance(self.leave_out, (list, tuple, set)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.leave_out):
            raise ValueError(f"leave_out={self.leave_out!r}: a list of layer indices (integers from 0).")
        self.leave_out = sorted(self.leave_out)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: a probability in [0, 1).")


@dataclass(kw_only=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (arXiv 2005.00247): one serial adapter after the FFN; it reads LayerNorm(h + x). ReLU, m = d/16."""

    original_ln_before: bool = True
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | dict = 16


@dataclass(kw_only=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (arXiv 1902.00751): serial adapters after the attention and after the FFN. Swish, m = d/16."""

    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float | dict = 16


@dataclass(kw_only=True)
class ParBnConfig(BnConfig):
    """He et al. (arXiv 2110.04366): a parallel adapter next to the FFN, scaled by 4, starting as the identity."""

    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | dict = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float = 4.0


def MAMConfig(prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None,
              task_type: str | None = None, **fields) -> ConfigUnion:
    """Mix-and-match adapters (He et al., arXiv 2110.04366) as AdapterHub's ``MAMConfig`` builds them: the ConfigUnion
    of prefix tuning in every attention layer and a parallel adapter next to every FFN.

    prefix_tuning: default ``PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True,
        encoder_hidden_size=800, task_type=task_type)``, AdapterHub's default (30 virtual tokens, re-parameterised by
        an MLP of width 800).
    adapter: default ``ParBnConfig()`` (bottleneck d/2, scaled by 4, starting as the identity).
    task_type: required (the prefix needs one); modules_to_save and the other fields go to the union.
    (A function, not a class as in AdapterHub: what it returns is an ordinary ConfigUnion, saved and loaded as one.)
    """
    if task_type is None:
        raise ValueError(f"MAMConfig needs a task_type, one of {PrefixTuningConfig.PROMPT_TASK_TYPES}: "
                         "its prefix decides by it what happens to token_type_ids.")
    if prefix_tuning is None:
        prefix_tuning = PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800,
                                           task_type=task_type)
    adapter = ParBnConfig() if adapter is None else adapter
    if not isinstance(prefix_tuning, PrefixTuningConfig) or not isinstance(adapter, BnConfig):
        raise TypeError(f"MAMConfig(prefix_tuning=PrefixTuningConfig(...), adapter=ParBnConfig(...)), not "
                        f"prefix_tuning={type(prefix_tuning).__name__}, adapter={type(adapter).__name__}.")
    return ConfigUnion(prefix_tuning, adapter, task_type=task_type, **fields)


# --- where adapters go ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One place for an adapter: layer ``layer`` (from 0), ``location`` "mh_adapter" or "output_adapter".

    module: the module the adapter wraps. residual_norm: in a pre-norm layer, the norm whose input is the
    residual stream x (None in post-norm layers, where the wrapped module gets x itself). adapterhub_path:
    where AdapterHub keeps this adapter, relative to the transformer layer (``attention.output.adapters``,
    ``attention_adapters.adapters``...).
    """

    layer: int
    location: str
    module: str
    style: str  # "post_norm" (BERT) or "pre_norm" (Llama)
    residual_norm: str | None
    adapterhub_path: str


_POST_NORM_PATHS = {"mh_adapter": "attention.output", "output_adapter": "output"}
_PRE_NORM_PATHS = {"mh_adapter": ("self_attn", "input_layernorm", "attention_adapters"),
                   "output_adapter": ("mlp", "post_attention_layernorm", "output_adapters")}


def _is_output_module(module: nn.Module | None) -> bool:
    """BERT's BertSelfOutput / BertOutput: dense → dropout → LayerNorm(· + input_tensor)."""
    return module is not None and all(hasattr(module, a) for a in ("dense", "dropout", "LayerNorm"))


def _layer_style(layer: nn.Module) -> str | None:
    if all(hasattr(layer, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
        return "pre_norm"
    attention_output = getattr(getattr(layer, "attention", None), "output", None)
    if _is_output_module(attention_output) and _is_output_module(getattr(layer, "output", None)):
        return "post_norm"
    return None


def find_sites(model: nn.Module) -> list[Site]:
    """Every place a bottleneck adapter can go, ordered by layer, attention before FFN (AdapterHub's order)."""
    inside_copies = tuple(n + "." for n, m in model.named_modules() if isinstance(m, TrainedCopy))
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) and not name.startswith(inside_copies)
              and all(_layer_style(layer) for layer in module)]
    if len(stacks) != 1:
        found = "no stack of transformer layers" if not stacks else f"{len(stacks)} stacks ({[n for n, _ in stacks]})"
        raise ValueError(
            f"peft_edu places bottleneck adapters in one stack of BERT-style (post-norm: attention.output and output "
            f"modules with dense, dropout and LayerNorm) or Llama-style (pre-norm: self_attn, mlp, input_layernorm, "
            f"post_attention_layernorm) layers; {type(model).__name__} has {found}."
        )
    stack_name, stack = stacks[0]
    sites = []
    for i, layer in enumerate(stack):
        prefix = f"{stack_name}.{i}." if stack_name else f"{i}."
        style = _layer_style(layer)
        for location in LOCATIONS:
            if style == "post_norm":
                path = _POST_NORM_PATHS[location]
                sites.append(Site(i, location, prefix + path, style, None, path + ".adapters"))
            else:
                path, norm, adapterhub = _PRE_NORM_PATHS[location]
                sites.append(Site(i, location, prefix + path, style, prefix + norm, adapterhub + ".adapters"))
    return sites


def plan(model: nn.Module, members: list[BnConfig]) -> dict[Site, BnConfig]:
    """Which config each site gets (sites that get none are left out), checked against the model."""
    sites = find_sites(model)
    n_layers = 1 + max(s.layer for s in sites)
    for c in members:
        beyond = [i for i in c.leave_out if i >= n_layers]
        if beyond:
            raise ValueError(f"leave_out={c.leave_out} names layers {beyond}, but {type(model).__name__} has "
                             f"{n_layers} layers (0 to {n_layers - 1}).")
        if isinstance(c.reduction_factor, dict):
            extra = [k for k in c.reduction_factor if k != "default" and int(k) >= n_layers]
            if extra:
                raise ValueError(f"reduction_factor={c.reduction_factor} names layers {extra}, but "
                                 f"{type(model).__name__} has {n_layers} layers.")
    chosen = {}
    for site in sites:
        matching = [c for c in members if getattr(c, site.location) and site.layer not in c.leave_out]
        if len(matching) > 1:
            raise ValueError(
                f"Layer {site.layer} ({site.location}, {site.module}) would get an adapter from {len(matching)} members "
                f"of the ConfigUnion; give each location one kind of adapter (use leave_out, mh_adapter, output_adapter)."
            )
        if matching:
            chosen[site] = matching[0]
    if not chosen:
        raise ValueError(f"The config places no adapter in {type(model).__name__}: every layer is left out.")
    return chosen


def bottleneck_size(config: BnConfig, hidden_size: int, layer: int) -> int:
    """AdapterHub's size: int(hidden_size // reduction_factor), at least 1 (a factor < 1 widens)."""
    factor = config.reduction_factor
    if isinstance(factor, dict):
        if str(layer) in factor:
            factor = factor[str(layer)]
        elif "default" in factor:
            factor = factor["default"]
        else:
            raise ValueError(f"reduction_factor={config.reduction_factor} has no entry for layer {layer} and no "
                             "'default', e.g. {'0': 8, 'default': 16}.")
    return max(1, int(hidden_size // factor))


def activation(name: str) -> nn.Module:
    """The non-linearity by name, the module transformers gives for it (as AdapterHub takes it)."""
    if name.lower() == "leakyrelu":
        return nn.LeakyReLU()
    from transformers.activations import get_activation

    return get_activation(name.lower())


# --- the layers ---------------------------------------------------------------------------------------
class ResidualTap(AdapterLayer):
    """Wraps the norm in front of a pre-norm sublayer and keeps its input, the residual stream x, for the
    adapter after that sublayer (which only sees the normalised input). It has no parameters."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.residual = None

    def forward(self, hidden_states, *args, **kwargs):
        self.residual = hidden_states
        return self.base_layer(hidden_states, *args, **kwargs)

    def take(self) -> torch.Tensor:
        residual, self.residual = self.residual, None  # do not keep the activation alive after use
        if residual is None:
            raise RuntimeError("The residual stream was not recorded: the norm in front of the adapted sublayer did "
                               "not run before it.")
        return residual

    def merge_into_base(self) -> None:
        raise NotImplementedError(MERGE_ERROR)


class BottleneckAdapter(AdapterLayer):
    """A bottleneck adapter around a sublayer's output module (see the module docstring for the placement).

    Parameters ``adapter_down`` (d → m) and ``adapter_up`` (m → d), both with bias; the file keys are
    ``<module>.adapter_down.weight`` etc. (AdapterHub's ``adapter_down.0.weight`` ... map onto them).
    """

    def __init__(self, base_layer: nn.Module, config: BnConfig, hidden_size: int, layer: int, location: str,
                 style: str, residual_tap: ResidualTap | None = None):
        super().__init__(base_layer)
        if style not in ("post_norm", "pre_norm"):
            raise ValueError(f"style={style!r}: 'post_norm' or 'pre_norm'.")
        if style == "post_norm" and not _is_output_module(base_layer):
            raise TypeError(f"A post-norm adapter wraps a module with dense, dropout and LayerNorm (BertOutput), "
                            f"not {type(base_layer).__name__}.")
        if style == "pre_norm" and (config.is_parallel or config.original_ln_before) and residual_tap is None:
            raise ValueError("This adapter reads the residual stream x: give the ResidualTap on the norm before it.")
        if style == "pre_norm" and not config.original_ln_after:
            raise ValueError("original_ln_after=False in a pre-norm layer (Llama): AdapterHub then returns the adapter's "
                             "output without the residual stream x, which peft_edu does not implement; use True.")
        if style == "pre_norm" and config.residual_before_ln == "post_add":
            raise ValueError("residual_before_ln='post_add' needs the layer's own LayerNorm after the sum, which a "
                             "pre-norm layer (Llama) does not have (AdapterHub fails here too); use True or False.")
        self.style, self.layer, self.location = style, layer, location
        self.is_parallel, self.original_ln_before = config.is_parallel, config.original_ln_before
        self.original_ln_after, self.residual_before_ln = config.original_ln_after, config.residual_before_ln
        self.adapter_residual_before_ln = config.adapter_residual_before_ln
        self.scaling = config.scaling
        self.bottleneck = bottleneck_size(config, hidden_size, layer)
        weight = next(base_layer.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        # As AdapterHub: two nn.Linear (their default init draws from the random stream), then the re-init
        # below, down before up, so that the same seed gives the same weights. The optional LayerNorms draw nothing.
        self.adapter_norm_before = nn.LayerNorm(hidden_size, **factory) if config.ln_before else None
        self.adapter_down = nn.Linear(hidden_size, self.bottleneck, **factory)
        self.non_linearity = activation(config.non_linearity)
        self.adapter_up = nn.Linear(self.bottleneck, hidden_size, **factory)
        self.adapter_norm_after = nn.LayerNorm(hidden_size, **factory) if config.ln_after else None
        self.dropout = nn.Dropout(config.dropout)
        self.__dict__["residual_tap"] = residual_tap  # shared with the tap, not a submodule of this layer
        self.reset_adapter_parameters(config.init_weights, config.init_weights_seed)

    @torch.no_grad()
    def reset_adapter_parameters(self, init_weights: str, seed: int | None = None) -> None:
        if seed:  # AdapterHub reseeds before each adapter module when init_weights_seed is set (and not 0)
            torch.manual_seed(seed)
        if init_weights == "bert":  # BERT's own init: N(0, 0.02²), biases 0
            self.adapter_down.weight.normal_(0.0, 0.02)
            self.adapter_up.weight.normal_(0.0, 0.02)
            self.adapter_down.bias.zero_()
            self.adapter_up.bias.zero_()
        elif init_weights == "mam_adapter":  # He et al.: A = 0 at the start
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()
        elif init_weights == "houlsby":  # Houlsby et al.: near zero, N(0, 0.01²) truncated at ±0.02
            for projection in (self.adapter_down, self.adapter_up):
                nn.init.trunc_normal_(projection.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                projection.bias.zero_()
        else:
            raise ValueError(f"init_weights={init_weights!r}: 'bert', 'houlsby' or 'mam_adapter'.")

    def up_projection(self, z: torch.Tensor) -> torch.Tensor:
        """s · (W_up f(W_down z + b_down) + b_up), before the dropout (z normalised first with ln_before); AdapterFusion
        attends over these (``composition.py``)."""
        if self.adapter_norm_before is not None:
            z = self.adapter_norm_before(z)
        return self.adapter_up(self.non_linearity(self.adapter_down(z))) * self.scaling

    def adapter(self, z: torch.Tensor) -> torch.Tensor:
        """A(z) = s · (W_up f(W_down z + b_down) + b_up), then the adapter's dropout (z normalised first with ln_before)."""
        return self.dropout(self.up_projection(z))

    def _serial(self, h: torch.Tensor, x: torch.Tensor | None, layer_norm: nn.Module | None) -> torch.Tensor:
        """A serial adapter on h: its input z and its skip connection r, as AdapterHub's ``Adapter`` forms them.

        With the presets (residual_before_ln=True, no new LayerNorms) this is A(z) + h, z = h or LN(h + x)."""
        z, r = self.serial_input(h, x, layer_norm)
        a = self.adapter(z)
        if self.adapter_norm_after is None:
            return a + r
        if self.adapter_residual_before_ln:
            return self.adapter_norm_after(a + r)
        return self.adapter_norm_after(a) + r

    def serial_input(self, h: torch.Tensor, x: torch.Tensor | None, layer_norm: nn.Module | None):
        """(z, r): what the serial adapter reads and what its skip connection carries (AdapterHub's ``pre_forward``)."""
        r = h
        z = h
        if self.original_ln_before:
            z = h + x
            if self.residual_before_ln == "post_add":
                r = z
            if layer_norm is not None:  # post-norm: the layer's own LayerNorm; pre-norm: none (AdapterHub passes none)
                z = layer_norm(z)
        if self.residual_before_ln is False:
            r = z
        return z, r

    def _parallel(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A parallel adapter on x, added next to the sublayer's output h (AdapterHub's ``ParallelAdapter``)."""
        a = self.adapter(x)
        if self.adapter_norm_after is not None:
            a = self.adapter_norm_after(a)
        return a + h

    def forward(self, *args, **kwargs):
        if self.style == "post_norm":
            return self._post_norm_forward(*args, **kwargs)
        return self._pre_norm_forward(*args, **kwargs)

    def _post_norm_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = base.dropout(base.dense(hidden_states))  # the sublayer's output
        x = input_tensor                             # the sublayer's input, its skip connection
        composition = self.__dict__.get("composition")  # Stack / Fuse of named adapters (composition.py)
        if composition is not None:
            return composition.forward_site(self, h, x)
        out = self._parallel(h, x) if self.is_parallel else self._serial(h, x, base.LayerNorm)
        return base.LayerNorm(out + x) if self.original_ln_after else out

    def _pre_norm_forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        x = self.residual_tap.take() if self.residual_tap is not None else None
        h = self._parallel(h, x) if self.is_parallel else self._serial(h, x, None)
        # The decoder layer adds x itself: x + (A(·) + h), the same sum AdapterHub forms as (A(·) + h) + x.
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def merge_into_base(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def extra_repr(self) -> str:
        kind = "parallel" if self.is_parallel else ("serial, reads LN(h + x)" if self.original_ln_before else "serial")
        return f"layer={self.layer}, location={self.location}, {kind}, bottleneck={self.bottleneck}, scaling={self.scaling:g}"


def hidden_size_of(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no config.hidden_size; bottleneck adapters need it "
                         "(AdapterHub sizes them from it too).")
    return size


def inject_bottleneck(model: nn.Module, configs: list[BnConfig], in_union: bool = False) -> list[BnConfig]:
    """Wrap each site that ``configs`` (one BnConfig, or a ConfigUnion's bottleneck members) select in a
    BottleneckAdapter."""
    for site, member in plan(model, configs).items():  # in AdapterHub's order: same seed, same initial weights
        tap = None
        if site.style == "pre_norm" and (member.is_parallel or member.original_ln_before):
            tap = model.get_submodule(site.residual_norm)
            if not isinstance(tap, ResidualTap):
                tap = ResidualTap(tap)
                replace_module(model, site.residual_norm, tap)
        base = model.get_submodule(site.module)
        replace_module(model, site.module, BottleneckAdapter(
            base, member, hidden_size_of(model), site.layer, site.location, site.style, residual_tap=tap))
    return configs


register_method(BnConfig, inject_bottleneck)
