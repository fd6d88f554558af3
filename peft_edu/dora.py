r"""DoRA: weight-decomposed low-rank adaptation (Liu et al., arXiv 2402.09353).

DoRA splits the adapted weight into a direction and a magnitude. The direction is LoRA's
W₀ + s·BA (see ``peft_edu.lora``); each output feature (each row i) is rescaled to a trainable
length mᵢ:

    W' = m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖,   ‖V‖ᵢ = ‖row i of V‖₂ (a norm over d_in, one per output)

    h = W'x + b = b + g ⊙ (W₀x + s·BAx),   g = m / ‖W₀ + s·BA‖ ∈ ℝ^{d_out}

* Parameters per layer: LoRA's r·(d_in + d_out) plus the magnitude m ∈ ℝ^{d_out}
  (``lora_magnitude_vector``, the name PEFT gives it, so adapter files map one to one).
* Initialisation: m = ‖W₀ + s·BA‖ = ‖W₀‖ (B = 0), so g = 1 and the model starts as the base model.
* The norm is a constant in backward (paper §4.3, as PEFT): gradients reach m directly and A, B
  through the direction only. That makes it a number to compute, never a graph to keep.
* Merging: W₀ ← g ⊙ (W₀ + s·BA); unmerging divides by the same g and subtracts s·BA again.

**The norm without the matrix.** PEFT forms the dense W₀ + s·BA (d_out × d_in) on every forward
to take its row norms. Expanding the square row by row avoids it:

    ‖wᵢ + s(BA)ᵢ‖² = ‖wᵢ‖² + 2s·⟨wᵢ, (BA)ᵢ⟩ + s²·‖(BA)ᵢ‖²
    ⟨wᵢ, (BA)ᵢ⟩ = Σⱼ Bᵢⱼ (W₀Aᵀ)ᵢⱼ            (W₀Aᵀ: d_out × r)
    ‖(BA)ᵢ‖²    = bᵢ G bᵢᵀ,  G = AAᵀ          (G: r × r)

‖wᵢ‖² depends on the frozen W₀ only and is cached (recomputed when W₀ changes). The largest
temporary is d_out × r, and all of it runs under no_grad. Observed, as the largest relative error
over rows against the dense norm in float64 (384×384, 576×1536 and 1536×576 layers with weights of
std 0.04 and ‖sBA‖/‖W₀‖ from 0 to 4, and the adapted layers of MiniLM and SmolLM2): float32
2.6e-7, where the dense float32 norm (PEFT's) has 2.0e-7; float64 1.7e-15.
The expanded form has one weak spot: when the update nearly cancels a row (‖wᵢ + s(BA)ᵢ‖ ≪ ‖wᵢ‖)
its error grows like ε‖wᵢ‖²/‖wᵢ + s(BA)ᵢ‖² (a row shortened 1000-fold: 20 % in float32, 5e-10 in
float64), and rounding may make the square slightly negative, so it is clamped at 0. A rank-r update
grown from B = 0 does not erase rows of W₀ in practice; ``tests/test_dora.py`` pins both regimes.

**Dropout, as PEFT does it.** With no active dropout (eval mode, or ``lora_dropout=0``) the layer
computes exactly h above. With active dropout, x̃ = dropout(x) goes into the DoRA part only, and
PEFT recomputes the base product on x̃ for it:

    h = W₀x + b + (g − 1) ⊙ W₀x̃ + g ⊙ s·BAx̃

(the base output keeps the full x; this is not the DoRA formula applied to x̃). We compute the same.

**How the sum is formed.** With u = W₀x̃ + s·BAx̃ (x̃ = x without dropout) we compute

    no active dropout:  h = g ⊙ u + b
    active dropout:     h = base(x) + (g ⊙ u − W₀x̃)

PEFT writes base(x) + (g − 1) ⊙ W₀x̃ + g ⊙ s·BAx̃ in both cases. The values agree; here autograd
keeps one (tokens × d_out) tensor for backward (u) instead of two (W₀x̃ and BAx̃), and without
dropout no term is cancelled against another, however far g is from 1. (PEFT's form returns base(x)
bit for bit at initialisation; this one returns W₀x + b within rounding.)

**The magnitude's gradient without a second copy.** ∂L/∂m needs u (∂h/∂mᵢ = uᵢ / ‖W‖ᵢ), a
(tokens × d_out) tensor, the one thing DoRA needs for backward beyond what LoRA keeps. Keeping u, or
the output h to recover u = (h − b) / g from it, costs a (tokens × d_out) tensor per layer wherever the
next operation does not keep h itself, and on MiniLM that is most layers: sdpa attention on the CPU
keeps its own scaled/reshaped copies of q, k and v, and a residual sum (after the attention output
and the MLP output projection) keeps nothing; only the GELU after ``intermediate.dense`` keeps h.
So, without dropout, ``ScaleLinearByMagnitude`` keeps neither: it keeps x and z = Ax, which LoRA keeps
anyway (A's gradient needs x, B's needs z: the very same tensors, so they are stored once), and
recomputes u = W₀x + s·Bz in backward with the operations the forward used (the same values, bit for
bit). DoRA then keeps what LoRA keeps, plus the norm (d_out numbers). The price is one more product
W₀x per layer and step in backward (a frozen layer's backward otherwise needs one product, for ∂L/∂x):
memory traded for time, as in gradient checkpointing. Measured on MiniLM (CPU, batch 8 × 64, see
``benchmarks/results/saved_activations_cpu.md``): kept for backward 1.207 → 1.001 × LoRA, train step
about 1.25 → 1.44 × LoRA. With active dropout the PEFT formula is computed by plain autograd (it keeps
W₀x̃ and u). ``ScaleByMagnitude`` (the output-keeping variant) remains for ``DoraEmbedding``, whose
input is token ids, not a tensor to recompute from.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .lora import LoraLinear, register_lora_variant


class ScaleByMagnitude(torch.autograd.Function):
    """h = g ⊙ u + b with g = m / ‖W‖, keeping h instead of u for backward.

    Autograd would keep u to compute ∂L/∂m = Σ_tokens (∂L/∂h ⊙ u) / ‖W‖. Here u is recovered in backward as
    (h − b) / g; h is the output, which the next operation usually keeps anyway (see the module docstring).
    """

    @staticmethod
    def forward(ctx, u, magnitude, norm, bias):
        g = magnitude / norm
        out = g * u
        if bias is not None:
            out = out + bias
        recoverable = bool((g != 0).all())
        ctx.recoverable = recoverable
        ctx.dtypes = (u.dtype, magnitude.dtype, norm.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(out if recoverable else u, g, norm, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept, g, norm, bias = ctx.saved_tensors
        return magnitude_backward(ctx, grad_out, g, norm, bias,
                                  lambda: kept if not ctx.recoverable else (kept if bias is None else kept - bias) / g)


def magnitude_backward(ctx, grad_out, g, norm, bias, recover_u):
    """The gradients of h = g ⊙ u + b (g = m / ‖W‖) for u, m, ‖W‖ and b; ``recover_u()`` gives u, called only when
    the magnitude's (or the norm's) gradient is wanted."""
    grad_u = grad_m = grad_norm = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_u = grad_out * g
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        u = recover_u()
        per_feature = (grad_out * u).reshape(-1, u.shape[-1]).sum(dim=0)  # Σ_tokens ∂L/∂h ⊙ u
        grad_m = per_feature / norm
        grad_norm = -per_feature * g / norm  # only if the norm is kept in the graph (DoRA detaches it)
    if bias is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
    u_dtype, m_dtype, norm_dtype, bias_dtype = ctx.dtypes  # mixed precision: each gradient in its input's dtype
    cast = lambda grad, dtype, wanted: grad.to(dtype) if wanted and grad is not None else None  # noqa: E731
    return (cast(grad_u, u_dtype, True), cast(grad_m, m_dtype, ctx.needs_input_grad[1]),
            cast(grad_norm, norm_dtype, ctx.needs_input_grad[2]), cast(grad_bias, bias_dtype, True))


def base_plus_update(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, lora_B_weight: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """u = W₀x + s·Bz. The update is accumulated into the base product by the matrix multiply itself (addmm_ with
    alpha = s): no s·Bz temporary and no separate passes to scale and add it (on MiniLM's CPU benchmark a DoRA step
    went from 1.20 to 1.17 × PEFT's). In place is safe: the product's backward does not read its output."""
    u = F.linear(x, weight)
    u.view(-1, u.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), lora_B_weight.to(z.dtype).T, alpha=scaling)
    return u


class ScaleLinearByMagnitude(torch.autograd.Function):
    """h = g ⊙ u + b with g = m / ‖W‖ and u = W₀x + s·Bz, keeping x and z (which LoRA keeps) instead of u.

    ∂L/∂u = g ⊙ ∂L/∂h needs g only; ∂L/∂m = Σ_tokens (∂L/∂h ⊙ u) / ‖W‖ needs u, recomputed in backward from x, z,
    W₀ and B (see the module docstring). W₀ and B are saved too: parameters, not copies, and saving them makes
    autograd refuse a backward after they changed in place, as it would for the forward's own products.
    """

    @staticmethod
    def forward(ctx, u, magnitude, norm, bias, x, z, weight, lora_B_weight, scaling):
        g = magnitude / norm
        out = g * u if bias is None else torch.addcmul(bias, u, g)  # b + u ⊙ g in one pass over the output
        ctx.scaling = scaling
        ctx.dtypes = (u.dtype, magnitude.dtype, norm.dtype, None if bias is None else bias.dtype)
        device_type = u.device.type  # the recomputation must see the forward's autocast, as checkpointing does
        ctx.autocast = dict(device_type=device_type, dtype=torch.get_autocast_dtype(device_type),
                            enabled=torch.is_autocast_enabled(device_type))
        ctx.save_for_backward(x, z, weight, lora_B_weight, magnitude, norm, bias)  # g again in backward: no copy
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, z, weight, lora_B_weight, magnitude, norm, bias = ctx.saved_tensors

        def recover_u():
            with torch.no_grad(), torch.autocast(**ctx.autocast):
                return base_plus_update(x, weight, z, lora_B_weight, ctx.scaling)  # as in DoraLinear.forward

        grads = magnitude_backward(ctx, grad_out, magnitude / norm, norm, bias, recover_u)
        return (*grads, None, None, None, None, None)  # x, z, W₀, B: their gradients flow through u's own graph


class DoraLinear(LoraLinear):
    """``LoraLinear`` whose update is rescaled per output feature to a trainable magnitude (see module docstring)."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, lora_bias: bool = False):
        if lora_bias:
            raise ValueError("lora_bias=True is not supported with DoRA (see LoraConfig.lora_bias).")
        super().__init__(base_layer, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         init_lora_weights=init_lora_weights)
        self._base_norm_cache: tuple | None = None  # (fingerprint of W₀, ‖wᵢ‖² per row); not saved
        self._merge_factor: torch.Tensor | None = None  # the g that merge multiplied W₀ by
        # m = ‖W₀ + s·BA‖ (= ‖W₀‖ while B = 0), in the dtype of W₀ as PEFT stores it.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    # --- the norm ---------------------------------------------------------------------------------
    def _base_row_sq_norms(self, dtype: torch.dtype) -> torch.Tensor:
        """‖wᵢ‖² of the frozen W₀, cached until W₀ changes.

        The fingerprint notices in-place updates (``weight += ...`` under no_grad bumps the tensor's
        version counter), a new tensor (``.to(...)``, ``weight.data = ...``) and deepcopies. A write
        through ``weight.data`` in place bypasses the version counter: call ``clear_norm_cache()`` then.
        """
        key = (self.base_weight_version(), dtype)
        if self._base_norm_cache is None or self._base_norm_cache[0] != key:
            with torch.no_grad():
                sq = torch.linalg.vector_norm(self.base_weight(), dim=1, dtype=dtype).square()
            self._base_norm_cache = (key, sq)
        return self._base_norm_cache[1]

    def clear_norm_cache(self) -> None:
        self._base_norm_cache = None

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W₀ + s·BA‖ per output feature (shape d_out), without forming W₀ + s·BA; no gradient."""
        w = self.base_weight()
        dtype = torch.promote_types(w.dtype, torch.float32)  # fp16/bf16 weights: accumulate in float32
        A, B = self.lora_factors()
        w_At = (w @ A.to(w.dtype).T).to(dtype)  # W₀Aᵀ, d_out × r
        A, B = A.to(dtype), B.to(dtype)
        cross = (B * w_At).sum(dim=1)  # ⟨wᵢ, (BA)ᵢ⟩
        quad = ((B @ (A @ A.T)) * B).sum(dim=1)  # ‖(BA)ᵢ‖² = bᵢ G bᵢᵀ
        s = self.scaling
        sq = self._base_row_sq_norms(dtype) + 2 * s * cross + s * s * quad
        return sq.clamp_min_(0).sqrt_().to(w.dtype)

    @torch.no_grad()
    def dense_weight_norm(self) -> torch.Tensor:
        """The same norm the way PEFT takes it, from the dense W₀ + s·BA (for tests and comparison)."""
        w = self.base_weight()
        return torch.linalg.vector_norm(w + self.delta_weight().to(w.dtype), dim=1)

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # g ⊙ (W₀ + s·BA) already lives inside the base weight
            self.refuse_training_while_merged()
            return self.base_layer(x)
        weight, bias = self.base_weight(), self.base_bias()
        x_lora = x.to(self.lora_A.weight.dtype)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            g = self.lora_magnitude_vector / self.weight_norm()  # the norm is a constant (no_grad)
            # As PEFT: the base output keeps the full x; the DoRA part sees dropout(x), W₀ included.
            result = self.base_layer(x)
            x_lora = self.lora_dropout(x_lora)
            base_part = F.linear(x_lora, weight.to(x_lora.dtype))
            u = base_part + self.lora_B(self.lora_A(x_lora)) * self.scaling
            return result + (g * u - base_part).to(result.dtype)
        weight = weight.to(x_lora.dtype)  # the tensor F.linear keeps (for ∂L/∂x): saved once, if a copy
        z = self.lora_A(x_lora)
        u = base_plus_update(x_lora, weight, z, self.lora_B.weight, self.scaling)
        return ScaleLinearByMagnitude.apply(u, self.lora_magnitude_vector, self.weight_norm(), bias,  # g ⊙ u + b
                                            x_lora, z, weight, self.lora_B.weight, self.scaling)

    # --- merge / unmerge --------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into_base(self) -> None:
        weight = self.base_weight()
        # (a convolution's magnitude is stored as (1, d_out, 1, ...), as PEFT stores it)
        g = (self.lora_magnitude_vector.reshape(-1) / self.weight_norm()).to(weight.dtype)
        if not torch.isfinite(g).all() or (g == 0).any():
            raise ValueError("Cannot merge this DoRA layer: a magnitude is zero or a norm is zero/not finite, so "
                             "the merged weight could not be unmerged again (rows would be lost).")
        self.remember_merged_factors()
        self.set_base_weight((weight + self.delta_weight().to(weight.dtype)) * g.unsqueeze(1))
        self._merge_factor = g
        self.clear_norm_cache()

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        # Divide by the very g and subtract the very s·BA that merge used (PEFT stores the norm and recomputes
        # m / norm and BA, which goes wrong if m, A or B changed while merged); W₀ is then what it was, up to rounding.
        weight = self.base_weight()
        self.set_base_weight(weight / self._merge_factor.unsqueeze(1) - self.merged_delta_weight().to(weight.dtype))
        self._merge_factor = None
        self.clear_norm_cache()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


register_lora_variant("use_dora", DoraLinear)
