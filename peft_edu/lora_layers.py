r"""LoRA, DoRA and IA³ on the layers PEFT adapts beyond ``nn.Linear``: each one a small variant, not a copy.

Every method of the course works on a layer's frozen weight as a dense matrix W₀ ∈ ℝ^{d_out×d_in}
(``injection.dense_weight``). Many layers are such a map in disguise, and once their weight is read as that
matrix, LoRA's ΔW = s·BA, DoRA's row norms and IA³'s row and column scales carry over unchanged; only
where the update meets the input differs:

* transformers' ``Conv1D`` (GPT-2's attention and MLP) is a linear layer whose weight is stored transposed
  (PEFT's ``fan_in_fan_out=True``): reading it transposed is all it needs, so ``LoraLinear``, ``DoraLinear`` and
  ``IA3Linear`` adapt it as they are.
* ``nn.Embedding``: the table is the linear map of one-hot tokens (W₀ = tableᵀ, d_in = vocabulary size), so
  ΔW's column t is the update of token t (``LoraEmbedding``).
* ``nn.Conv1d/2d/3d``: each output position applies W₀ (flattened to d_out × d_in·k) to one input patch
  (im2col), so LoRA on the patch matrix is a convolution A with the base layer's kernel followed by a 1×1
  convolution B (``LoraConv``); IA³ scales channels (``IA3Conv``).
* ``nn.MultiheadAttention`` reads its weights itself, so its LoRA substitutes adapted weights for one call
  (``LoraMultiheadAttention``); so does LoRA on a bare matrix parameter (``LoraParameter``, PEFT's
  ``target_parameters``).

DoRA adapts all of them but the attention and bare parameters (as in PEFT) and grouped convolutions. The module
also holds the two initialisations that move part of W₀ into BA, PiSSA and OLoRA (``pissa_init``, ``olora_init``).
Each class is equal to PEFT 0.21.2's layer of that type (outputs, gradients, merging, adapter files), but for
one PEFT bug, in the attention's out_proj; ``tests/test_lora_layers.py`` and ``tests/test_peft_case_matrix.py``
check it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from . import ia3
from .dora import DoraLinear, ScaleByMagnitude
from .injection import dense_weight, set_dense_weight
from .lora import BASE_CHANGING_INITS, LoraLinear, register_lora_variant, reset_factors

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- convolutions ---------------------------------------------------------------------------------
class LoraConv(LoraLinear):
    r"""LoRA on ``nn.Conv1d/2d/3d``, built as PEFT builds it:

        h = conv(x; W₀) + b + s · conv₁ₓ₁(conv(dropout(x); A); B)

    A is a convolution with the base layer's kernel, stride and padding and r output channels (r × d_in × k),
    B a 1×1 convolution back to d_out channels with the base layer's ``groups`` (d_out × r/groups). On one patch p
    of the input (d_in·k numbers) the update is ΔW p with ΔW = B A on the flattened weights: LoRA on the patch
    matrix, which is also what merging adds to W₀ flattened. With groups > 1, W₀ connects channels only within a
    group while A reads all of them, so ΔW is not a grouped weight and cannot be merged (PEFT refuses too); such a
    layer still trains, saves and loads.
    """

    def create_factors(self, r: int, lora_bias: bool) -> None:
        base = self.base_layer
        if any(step != 1 for step in base.dilation) or base.padding_mode != "zeros":
            raise ValueError(
                f"LoRA on a convolution with dilation={base.dilation} and padding_mode={base.padding_mode!r} is not "
                "supported: A is built as PEFT builds it, undilated and zero-padded, so it would not read the patches "
                "W₀ reads (PEFT then fails on mismatched shapes or merges to another function). Adapt convolutions "
                "with dilation=1 and padding_mode='zeros'.")
        if r % base.groups:
            raise ValueError(f"r={r} with groups={base.groups} is not supported: B is a grouped 1×1 convolution, so r "
                             f"must be divisible by groups (PEFT's rule); choose r = a multiple of {base.groups}.")
        conv = next(kind for kind in CONVOLUTIONS if isinstance(base, kind))
        weight = self.base_weight()
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False, **factory)
        self.lora_B = conv(r, base.out_channels, 1, 1, groups=base.groups, bias=lora_bias, **factory)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight.flatten(1), self.lora_B.weight.flatten(1)

    def merge_into_base(self) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError(
                f"Merging LoRA into a convolution with groups={self.base_layer.groups} is not supported: the update reads "
                "every input channel, the grouped weight only those of its group (PEFT refuses it too). Keep the "
                "adapter unmerged.")
        super().merge_into_base()


class DoraConv(LoraConv, DoraLinear):
    r"""DoRA on a convolution, as PEFT: each output channel i is rescaled to a trainable magnitude mᵢ,

        h = g ⊙ (conv(x; W₀) + s · BA x) + b,      g = m / ‖W₀ + s·BA‖ per output channel

    with the norm of row i of the flattened weight (``DoraLinear``'s norm, unchanged). The magnitude is stored
    with shape (1, d_out, 1, ...), as PEFT stores it, so it broadcasts over (batch, channels, positions).
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, lora_bias: bool = False):
        if base_layer.groups > 1:
            raise ValueError(
                f"DoRA on a convolution with groups={base_layer.groups} is not supported: DoRA divides by the norm of "
                "W₀ + ΔW, and PEFT's grouped LoRA update ΔW (a full convolution A, then a grouped 1×1 B) does not have "
                "the grouped weight's shape, so that norm has no one meaning. Use LoRA (use_dora=False) on this layer.")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias)
        shape = (1, -1) + (1,) * len(base_layer.kernel_size)
        self.lora_magnitude_vector = nn.Parameter(self.lora_magnitude_vector.detach().reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self.refuse_training_while_merged()
            return self.base_layer(x)
        magnitude, bias = self.lora_magnitude_vector, self.base_bias()
        g = magnitude / self.weight_norm().reshape(magnitude.shape)  # the norm is a constant (no_grad)
        b = 0 if bias is None else bias.reshape(magnitude.shape)
        result = self.base_layer(x)
        x_lora = x.to(self.lora_A.weight.dtype)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # As PEFT (and DoraLinear): the base output keeps the full x; the DoRA part sees dropout(x), W₀ included.
            x_lora = self.lora_dropout(x_lora)
            base_part = self.base_layer(x_lora) - b
            return result + (g * (base_part + self.lora_B(self.lora_A(x_lora)) * self.scaling) - base_part)
        u = (result - b) + self.lora_B(self.lora_A(x_lora)) * self.scaling  # conv(x; W₀) + s·BAx
        return (g * u + b).to(result.dtype)


# --- embeddings -----------------------------------------------------------------------------------
class LoraEmbedding(LoraLinear):
    r"""LoRA on ``nn.Embedding``. The table (num_embeddings × dim) is the linear map of one-hot tokens, so W₀ is its
    transpose (d_out = dim, d_in = num_embeddings), ΔW = s·BA with A ∈ ℝ^{r×num_embeddings}, B ∈ ℝ^{dim×r}, and
    token t gets

        h = table[t] + s · B A[:, t]

    column t of A is looked up like an embedding (``F.embedding`` of Aᵀ), then multiplied by B. PEFT, after
    loralib, starts the other way round from linear layers: A = 0 and B ~ N(0, 1) (ΔW = 0 all the same), and names
    the factors ``lora_embedding_A`` / ``lora_embedding_B``, plain tensors. ``lora_dropout`` is not applied (the
    input is token ids; PEFT ignores it too). Merging adds ΔWᵀ to the table.
    """

    def create_factors(self, r: int, lora_bias: bool) -> None:
        base = self.base_layer
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for an nn.Embedding: it has no bias to fold B's bias "
                             "into (PEFT refuses it too). Set lora_bias=False, or leave the embedding out of "
                             "target_modules.")
        if base.max_norm is not None:
            raise ValueError(f"LoRA on an nn.Embedding with max_norm={base.max_norm} is not supported: the lookup "
                             "rescales the table's rows in place, which the update's own lookup would not follow.")
        weight = self.base_weight()
        d_out, d_in = weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        # Drawn as PEFT draws them, so that init_lora_weights=False keeps the same random factors.
        self.lora_embedding_A = nn.Parameter(torch.randn(r, d_in).to(**factory))
        self.lora_embedding_B = nn.Parameter(torch.randn(d_out, r).to(**factory))

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported for an Embedding layer, only for "
                             "Linear layers (PEFT ignores it on embeddings and starts them as usual).")
        if init_lora_weights is False:
            return
        nn.init.zeros_(self.lora_embedding_A)  # PEFT's embedding init for True and "gaussian" alike
        nn.init.normal_(self.lora_embedding_B)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def lora_B_bias(self) -> None:
        return None

    def embedding_update(self, tokens: torch.Tensor) -> torch.Tensor:
        """s · B A[:, t] for each token t: the lookup of Aᵀ (with the table's padding and gradient options), then B."""
        base = self.base_layer
        columns = F.embedding(tokens, self.lora_embedding_A.T, padding_idx=base.padding_idx,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        update = (columns @ self.lora_embedding_B.T) * self.scaling
        embed_scale = getattr(base, "embed_scale", None)  # Gemma's scaled embeddings scale the lookup: the update too
        return update if embed_scale is None else update * embed_scale.to(update.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(tokens)
        if self.merged:
            self.refuse_training_while_merged()
            return result
        return result + self.embedding_update(tokens).to(result.dtype)


class DoraEmbedding(LoraEmbedding, DoraLinear):
    r"""DoRA on an embedding, as PEFT: each embedding feature j (row j of W₀ = tableᵀ, a norm over the vocabulary)
    is rescaled to a trainable magnitude, h = g ⊙ (table[t] + s·BA[:, t]), g = m / ‖W₀ + s·BA‖ ∈ ℝ^{dim}."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self.refuse_training_while_merged()
            return self.base_layer(tokens)
        u = self.base_layer(tokens) + self.embedding_update(tokens)
        return ScaleByMagnitude.apply(u, self.lora_magnitude_vector, self.weight_norm(), None)


# --- multi-head attention -------------------------------------------------------------------------
# What LoRA adapts in an nn.MultiheadAttention first: the packed query/key/value projection (3E × E).
@dense_weight.register
def _(layer: nn.MultiheadAttention) -> torch.Tensor:
    return layer.in_proj_weight


@set_dense_weight.register
def _(layer: nn.MultiheadAttention, weight: torch.Tensor) -> None:
    layer.in_proj_weight.copy_(weight)


class LoraMultiheadAttention(LoraLinear):
    r"""LoRA on ``nn.MultiheadAttention``, as PEFT does it: one update of the packed query/key/value projection
    ``in_proj_weight`` (3E × E, the factors ``lora_A``/``lora_B``) and one of ``out_proj.weight`` (E × E,
    ``out_proj.lora_A``/``out_proj.lora_B``):

        attention(x; W_in + s·BA, W_out + s·B′A′)

    The attention reads both weights itself and never calls ``out_proj`` (which is why adapting ``out_proj`` alone
    cannot work), so no layer's forward can add an update. Instead the attention is called with the adapted weights
    in place of its own (``torch.func.functional_call``), which keeps the gradient path to the four factors and
    leaves the attention module untouched. PEFT 0.21.2 merges before each forward and unmerges after, and adds
    out_proj's update twice on the way (W_out + 2s·B′A′, huggingface/peft PR #3774): the same adapter file gives
    other outputs there (``parity.check_mha_against_peft`` pins both). As in PEFT: query, key and value of one size
    only, no DoRA. Not supported either: ``lora_dropout`` (the update acts on weights, there is no input to drop;
    PEFT ignores the setting here) and ``lora_bias``. Adapter files name out_proj's factors
    ``<name>.base_layer.out_proj.lora_A.weight``, where PEFT nests them.
    """

    def __init__(self, base_layer: nn.MultiheadAttention, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, lora_bias: bool = False):
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on an nn.MultiheadAttention with kdim or vdim other than embed_dim is not supported "
                             "(its query, key and value weights are then separate; PEFT has the same limit).")
        if lora_dropout:
            raise ValueError(f"lora_dropout={lora_dropout} is not supported for an nn.MultiheadAttention: its update is "
                             "added to the weights, there is no input to drop (PEFT ignores the setting). Set "
                             "lora_dropout=0, or leave the attention out of target_modules.")
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for an nn.MultiheadAttention (the attention reads its "
                             "weights, not a layer's output). Set lora_bias=False.")
        super().__init__(base_layer, r, lora_alpha, use_rslora=use_rslora, init_lora_weights=init_lora_weights)
        d_out, d_in = dense_weight(base_layer.out_proj).shape
        factory = {"device": self.lora_A.weight.device, "dtype": self.lora_A.weight.dtype}
        self.out_proj = nn.ModuleDict({"lora_A": nn.Linear(d_in, r, bias=False, **factory),
                                       "lora_B": nn.Linear(r, d_out, bias=False, **factory)})
        reset_factors(self.out_proj.lora_A, self.out_proj.lora_B, r, init_lora_weights)

    def out_proj_delta(self, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """s · B′A′, the update of out_proj.weight (of the given (A′, B′), by default the current ones)."""
        A, B = factors or (self.out_proj.lora_A.weight, self.out_proj.lora_B.weight)
        return self.scaling * (B @ A)

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self.merged:
            self.refuse_training_while_merged()
            return self.base_layer(query, *args, **kwargs)
        out_proj = self.base_layer.out_proj
        adapted = {"in_proj_weight": self.base_weight() + self.delta_weight(),
                   "out_proj.weight": dense_weight(out_proj) + self.out_proj_delta()}
        return torch.func.functional_call(self.base_layer, adapted, (query, *args), kwargs)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        super().merge_into_base()  # in_proj_weight
        out_proj = self.base_layer.out_proj
        self._merged_out_proj = (self.out_proj.lora_A.weight.clone(), self.out_proj.lora_B.weight.clone())
        set_dense_weight(out_proj, dense_weight(out_proj) + self.out_proj_delta(self._merged_out_proj))

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        super().unmerge_from_base()
        out_proj = self.base_layer.out_proj
        set_dense_weight(out_proj, dense_weight(out_proj) - self.out_proj_delta(self._merged_out_proj))
        self._merged_out_proj = None

    def own_state_dict(self) -> dict:
        """PEFT's file keys: it wraps out_proj inside the attention, so out_proj's factors sit under base_layer."""
        return {("base_layer." + key if key.startswith("out_proj.") else key): tensor
                for key, tensor in super().own_state_dict().items()}


# --- a bare parameter (target_parameters) ---------------------------------------------------------------
class LoraParameter(LoraLinear):
    r"""LoRA on one 2-D parameter of a module (PEFT's ``target_parameters``), for a module that multiplies by a matrix
    itself instead of holding an nn.Linear (mixture-of-experts blocks, custom layers):

        module(x; W + s·BA)    in place of    module(x; W)

    The matrix is taken as stored, (rows, columns) = (d_out, d_in), whatever the module does with it (as PEFT takes a
    2-D parameter). The module is called with W + s·BA in place of W (``torch.func.functional_call``, as for
    nn.MultiheadAttention); PEFT registers a parametrization for the call, the same function. Merging adds s·BA to W.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, lora_alpha: float, use_rslora: bool = False,
                 init_lora_weights: bool | str = True):
        self.parameter_name = parameter_name  # base_weight() needs it while the factors are built
        super().__init__(base_layer, r, lora_alpha, use_rslora=use_rslora, init_lora_weights=init_lora_weights)

    def base_weight(self) -> torch.Tensor:
        return getattr(self.base_layer, self.parameter_name)

    def base_bias(self) -> None:
        return None  # the module's own bias, if any, is not part of the adapted matrix

    def set_base_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_weight().copy_(weight)

    def forward(self, *args, **kwargs):
        if self.merged:
            self.refuse_training_while_merged()
            return self.base_layer(*args, **kwargs)
        adapted = {self.parameter_name: self.base_weight() + self.delta_weight().to(self.base_weight().dtype)}
        return torch.func.functional_call(self.base_layer, adapted, args, kwargs)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, " + super().extra_repr()


# --- IA³ on convolutions --------------------------------------------------------------------------
class IA3Conv(ia3.IA3Linear):
    r"""IA³ on ``nn.Conv2d``/``nn.Conv3d``, as PEFT: l rescales channels, stored with shape (1, C, 1, ...) as PEFT
    stores it. Output channels, h = l ⊙ (conv(x) + b); with ``is_feedforward`` the input channels, h = conv(l ⊙ x) + b.
    Merging scales the flattened weight's rows (output channels), or its columns by their input channel, which with
    groups is the channel of the row's own group."""

    def vector_shape(self) -> tuple[int, ...]:
        base = self.base_layer
        channels = base.in_channels if self.is_feedforward else base.out_channels
        return (1, channels) + (1,) * len(base.kernel_size)

    def activation_scale(self) -> torch.Tensor:
        return self.ia3_l  # (1, C, 1, ...) broadcasts over (batch, channels, positions)

    def weight_scale(self, vector: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self.is_feedforward:
            return vector.reshape(-1, 1)
        groups, in_per_group = base.groups, base.in_channels // base.groups
        per_group = vector.reshape(groups, 1, in_per_group, 1)  # column (channel c of the group, kernel position)
        return per_group.expand(groups, base.out_channels // groups, in_per_group, math.prod(base.kernel_size)
                                ).reshape(base.out_channels, -1)


# --- initialisations that move part of W₀ into BA ---------------------------------------------------
@torch.no_grad()
def pissa_init(layer: LoraLinear, init_lora_weights: str) -> None:
    r"""PiSSA (Meng et al., arXiv 2404.02948), as PEFT computes it: with the SVD W₀ = U S Vᵀ, B₀A₀ is the top-r part,

        B₀ = U_r √(S_r/s),   A₀ = √(S_r/s) V_rᵀ,   W₀ ← W₀ − s·B₀A₀   (the residual; the output is unchanged)

    so training moves the principal directions, not a random start. "pissa_niter_K": a randomized SVD with K
    iterations (``torch.svd_lowrank``, faster on large layers, drawn from torch's RNG)."""
    weight = _base_changing_layer(layer, init_lora_weights).to(torch.float32)
    r = layer.r
    if init_lora_weights == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, r, niter=int(init_lora_weights.split("_niter_")[1]))
        Vh = V.T
    root = torch.diag(torch.sqrt(S / layer.scaling))
    _move_into_factors(layer, A=root @ Vh, B=U @ root)


@torch.no_grad()
def olora_init(layer: LoraLinear, init_lora_weights: str) -> None:
    r"""OLoRA (Büyükakyüz, arXiv 2406.01775), as PEFT computes it: with the QR decomposition W₀ = QR, B₀ = Q_{:, :r}
    (orthonormal columns) and A₀ = R_{:r}, and W₀ ← W₀ − s·B₀A₀."""
    Q, R = torch.linalg.qr(_base_changing_layer(layer, init_lora_weights).to(torch.float32))
    _move_into_factors(layer, A=R[: layer.r], B=Q[:, : layer.r])


def _base_changing_layer(layer: LoraLinear, init_lora_weights: str) -> torch.Tensor:
    supported = (nn.Linear, Conv1D) if init_lora_weights.startswith("pissa") else (nn.Linear,)
    if type(layer) not in (LoraLinear, DoraLinear) or not isinstance(layer.base_layer, supported):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported for a "
                         f"{type(layer.base_layer).__name__} layer, only for {', '.join(t.__name__ for t in supported)} "
                         "layers (PEFT fails on convolutions and with OLoRA on Conv1D, and ignores it on embeddings).")
    weight = layer.base_weight()
    if layer.r > min(weight.shape):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} with r={layer.r} is not supported for a "
                         f"{weight.shape[0]}×{weight.shape[1]} weight: its decomposition has only {min(weight.shape)} "
                         f"parts; choose r ≤ {min(weight.shape)}.")
    return weight


def _move_into_factors(layer: LoraLinear, A: torch.Tensor, B: torch.Tensor) -> None:
    layer.lora_A.weight.copy_(A)
    layer.lora_B.weight.copy_(B)
    layer.initial_factors = (layer.lora_A.weight.clone(), layer.lora_B.weight.clone())
    weight = layer.base_weight()
    layer.set_base_weight((weight.to(torch.float32) - layer.scaling * B @ A).to(weight.dtype))


BASE_CHANGING_INITS.update(pissa=pissa_init, olora=olora_init)


# --- which class adapts which layer type ------------------------------------------------------------
register_lora_variant(None, LoraLinear, Conv1D)
register_lora_variant("use_dora", DoraLinear, Conv1D)
register_lora_variant(None, LoraEmbedding, nn.Embedding)
register_lora_variant("use_dora", DoraEmbedding, nn.Embedding)
for _conv in CONVOLUTIONS:
    register_lora_variant(None, LoraConv, _conv)
    register_lora_variant("use_dora", DoraConv, _conv)
register_lora_variant(None, LoraMultiheadAttention, nn.MultiheadAttention)
register_lora_variant(None, LoraParameter, nn.Parameter)
ia3.LAYER_CLASSES.update({nn.Conv2d: IA3Conv, nn.Conv3d: IA3Conv})
