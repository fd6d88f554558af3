r"""Adapter arithmetic: a new LoRA adapter combined from the model's others, as PEFT 0.21.2's ``add_weighted_adapter``.

Adapters i = 1..n with factors Aᵢ (r × d_in), Bᵢ (d_out × r), scalings sᵢ and the user's weights wᵢ give, in every
layer that at least one of them adapts (the others are left out there), a new adapter of rank r' with α = r' (so
its scaling is 1; with ``use_rslora`` it is √r', as PEFT's), copied from the first adapter's config otherwise:

* ``cat`` (exact):   A' = [w₁s₁A₁; …; wₙsₙAₙ] (rows), B' = [B₁ … Bₙ] (columns), r' = Σ rᵢ, so
  B'A' = Σ wᵢ sᵢ BᵢAᵢ = Σ wᵢ ΔWᵢ.
* factor-wise, equal ranks r' = r: each adapter's weight is split over its two factors, aᵢ = sign(wᵢsᵢ)·√|wᵢsᵢ|
  on A and bᵢ = √|wᵢsᵢ| on B, and A' = merge(Aᵢ; aᵢ), B' = merge(Bᵢ; bᵢ). B'A' = Σᵢⱼ aᵢbⱼ BⱼAᵢ includes the cross
  terms i ≠ j: an approximation of Σ wᵢ ΔWᵢ, which is what PEFT computes. merge is one of
    - ``linear``:          Σ aᵢ Tᵢ (task arithmetic, Ilharco et al., arXiv 2212.04089)
    - ``magnitude_prune``: Σ aᵢ top_k(Tᵢ), top_k keeps the k = ⌊density·numel⌋ entries of largest |·|, zeroes the rest
    - ``ties`` (Yadav et al., arXiv 2306.01708): T̃ᵢ = top_k(Tᵢ); elect a sign per entry, σ = sign(Σᵢ T̃ᵢ)
      (``majority_sign_method="total"``) or sign(Σᵢ sign T̃ᵢ) ("frequency"), σ = +1 on a tie; then the mean over the
      adapters that agree with it, Σᵢ [sign T̃ᵢ = σ] aᵢT̃ᵢ / max(1, Σᵢ [sign T̃ᵢ = σ])
    - ``dare_linear`` / ``dare_ties`` (Yu et al., arXiv 2311.03099): as linear / ties, but with T̃ᵢ = Mᵢ ⊙ Tᵢ / density,
      Mᵢ ~ Bernoulli(density) drawn for each tensor (so results depend on torch's random state)
* ``svd`` and ``<merge>_svd``: ΔW' = merge(ΔWᵢ; wᵢ) with ΔWᵢ = sᵢBᵢAᵢ (the weight not split), then its truncated
  SVD, U S Vᵀ: B' = U[:, :r'] S[:r'], A' = Vᵀ[:r'], r' = ``svd_rank`` (default: the largest rank); ``svd_clamp=q``
  clips both to ± the q-quantile of their entries.

One adapter alone is always combined ``linear`` (as PEFT). A density of 1 keeps every entry. The random draws come
in PEFT's order (layers in the model's order; in each, A's tensors, then B's), after the new adapter's own
initialisation, so the same seed gives PEFT's masks.

Refused where PEFT would compute something that is no combination of the inputs (PEFT 0.21.2 accepts these): DoRA
adapters (only A and B would be combined: each magnitude vector is dropped, the new one is computed when the new
adapter is created, before its A and B are filled in), ``lora_bias`` (B's bias is not combined), PiSSA/OLoRA (their
B A is relative to a changed W₀), trained copies (``modules_to_save``, heads, trainable tokens), and an ``svd_rank``
above a layer's min(d_out, d_in) (PEFT's factors would not fit the layer). Layers: nn.Linear, Conv1D and nn.Embedding
(whose A is r × num_embeddings, ΔW = s·BA the transposed table update, see ``lora_layers.LoraEmbedding``); PEFT's
convolutions and attention layers are not combined here. PEFT silently does nothing when ``adapter_name`` exists;
here it is an error, as are mismatched lengths (PEFT zips them) and an argument the chosen combination does not use.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .lora import LoraConfig, LoraLinear
from .lora_layers import LoraEmbedding
from .model import add_adapter
from .named_adapters import active_config, adapter_parts, check_new_name, delete_adapter, list_adapters, refuse_while_merged

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_BASED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_WISE, *SVD_BASED)
NEED_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # and their _svd forms
ELECT_SIGN = ("ties", "dare_ties")
# Layers whose lora_factors() are the parameters themselves, A (r × d_in) and B (d_out × r), ΔW = s·BA (d_out × d_in)
COMBINABLE_LAYERS = (LoraLinear, LoraEmbedding)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add adapter ``adapter_name``, combined from the LoRA ``adapters`` with ``weights`` (see the module docstring),
    parked as ``add_adapter`` parks one: ``set_adapter(model, adapter_name)`` makes it active."""
    layers_of, configs = _check_adapters(model, adapters)
    _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_driver,
                     density, majority_sign_method)
    if len(adapters) == 1:
        combination_type = "linear"  # PEFT's rule: one adapter is only rescaled
    ranks = [config.r for config in configs]
    new_rank = _new_rank(combination_type, ranks, svd_rank, adapters, layers_of)
    new_config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank,
                                     target_modules=_union_of_targets(configs, adapters))
    add_adapter(model, adapter_name, new_config)  # draws its initial factors first, as PEFT's inject_adapter
    try:
        with torch.no_grad():
            for name, layer in model.peft_edu_parked[adapter_name].parts:
                present = [(layers[name], weight) for layers, weight in zip(layers_of, weights) if name in layers]
                if combination_type == "cat":
                    A, B = _concatenated(present, new_rank)
                elif combination_type in FACTOR_WISE:
                    A, B = _factor_wise(present, combination_type, density, majority_sign_method)
                else:
                    A, B = _truncated_svd(present, combination_type.removesuffix("_svd"), new_rank, density,
                                          majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
                new_A, new_B = layer.lora_factors()
                new_A.copy_(A)
                new_B.copy_(B)
    except Exception:
        delete_adapter(model, adapter_name)  # a failed combination leaves no half-filled adapter behind
        raise


# --- the three ways to build A' and B' --------------------------------------------------------------------------
def _concatenated(present: list[tuple[LoraLinear, float]], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A' = [wᵢsᵢAᵢ] stacked by rows, B' = [Bᵢ] side by side; the rows of the adapters absent here stay zero."""
    A_parts = [layer.lora_factors()[0] * weight * layer.scaling for layer, weight in present]
    B_parts = [layer.lora_factors()[1] for layer, _ in present]
    A_cat, B_cat = torch.cat(A_parts, dim=0), torch.cat(B_parts, dim=1)
    A = A_cat.new_zeros(new_rank, A_cat.shape[1])
    B = B_cat.new_zeros(B_cat.shape[0], new_rank)
    A[:A_cat.shape[0]], B[:, :B_cat.shape[1]] = A_cat, B_cat
    return A, B


def _factor_wise(present, method: str, density, majority_sign_method) -> tuple[torch.Tensor, torch.Tensor]:
    """Each factor merged on its own, wᵢsᵢ split as sign·√|wᵢsᵢ| on A and √|wᵢsᵢ| on B (the sign on one side only)."""
    scaled = [weight * layer.scaling for layer, weight in present]
    A_0 = present[0][0].lora_factors()[0]
    on_A = torch.tensor([math.sqrt(abs(ws)) * (1 if ws >= 0 else -1) for ws in scaled], device=A_0.device)
    on_B = torch.tensor([math.sqrt(abs(ws)) for ws in scaled], device=A_0.device)
    dtype = A_0.dtype
    A = merge([layer.lora_factors()[0] for layer, _ in present], on_A, method, density, majority_sign_method)
    B = merge([layer.lora_factors()[1] for layer, _ in present], on_B, method, density, majority_sign_method)
    return A.to(dtype), B.to(dtype)


def _truncated_svd(present, method: str, new_rank: int, density, majority_sign_method, clamp, full_matrices,
                   driver) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r' truncated SVD of the merged ΔW: B' = U S (first r' columns), A' = Vᵀ (first r' rows)."""
    deltas = [layer.delta_weight() for layer, _ in present]
    weights = torch.tensor([weight for _, weight in present], device=deltas[0].device)
    merged = merge(deltas, weights, "linear" if method == "svd" else method, density, majority_sign_method)
    U, S, Vh = torch.linalg.svd(merged, full_matrices=full_matrices, driver=driver)
    B, A = U[:, :new_rank] @ torch.diag(S[:new_rank]), Vh[:new_rank, :]
    if clamp is not None:
        limit = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-limit, limit), A.clamp(-limit, limit)
    return A, B


# --- merging tensors of the same shape (the methods of the docstring) -------------------------------------------
def merge(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None = None,
          majority_sign_method: str = "total") -> torch.Tensor:
    """merge(Tᵢ; weights) for ``method`` in linear, magnitude_prune, ties, dare_linear, dare_ties."""
    if method in ("magnitude_prune", "ties"):
        tensors = [keep_largest(tensor, density) for tensor in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [drop_at_random(tensor, density) for tensor in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if method not in ELECT_SIGN:
        return weighted.sum(dim=0)
    agrees = agrees_with_elected_sign(stacked, majority_sign_method)  # elected on the unweighted tensors, as PEFT
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The k = ⌊density·numel⌋ entries of largest magnitude, the others zero (density 1: the tensor itself)."""
    if density >= 1:
        return tensor
    keep = torch.zeros_like(tensor).reshape(-1)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def drop_at_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide by it, so the expectation is the tensor."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def agrees_with_elected_sign(stacked: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """TIES' election: True where an adapter's entry has the sign elected for that entry (+ on a tie)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


# --- checks: everything is refused before the model changes -----------------------------------------------------
def _check_adapters(model: nn.Module, adapters) -> tuple[list[dict[str, LoraLinear]], list[LoraConfig]]:
    """The LoRA layers of each adapter by module name, and its config; the errors name what cannot be combined."""
    active_config(model)
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"adapters={adapters!r}: give a non-empty list of adapter names, from {list_adapters(model)}.")
    unknown = [name for name in adapters if name not in list_adapters(model)]
    if unknown:
        raise ValueError(f"The model has no adapter named {unknown[0]!r}; its adapters are {list_adapters(model)}.")
    refuse_while_merged(model, "combine adapters")
    layers_of, configs = [], []
    for name in adapters:
        config, parts = adapter_parts(model, name)
        _check_combinable(name, config)
        for module_name, module in parts:
            if type(module) not in COMBINABLE_LAYERS:
                raise ValueError(f"Adapter {name!r} has a {type(module).__name__} at {module_name}: only LoRA on "
                                 "nn.Linear, Conv1D and nn.Embedding layers can be combined here; leave that layer "
                                 "out of target_modules.")
        layers_of.append(dict(parts))
        configs.append(config)
    return layers_of, configs


def _check_combinable(name: str, config) -> None:
    if not isinstance(config, LoraConfig):
        raise ValueError(f"Adapter {name!r} is {config.peft_type}, not LoRA: add_weighted_adapter combines LoRA "
                         "adapters only (their low-rank factors).")
    refusals = {
        "use_dora": "its magnitude vector would be dropped (PEFT combines only A and B, and gives the new adapter the "
                    "magnitude of freshly drawn factors); combine plain LoRA adapters",
        "lora_bias": "B's bias would be dropped (PEFT does not combine it); train the adapters with lora_bias=False",
        "modules_to_save": "its trained copies of whole modules cannot be combined; train without modules_to_save",
        "trainable_token_indices": "its trained embedding rows cannot be combined; train without them",
        "target_parameters": "PEFT does not combine adapters of bare parameters (target_parameters)",
    }
    for field, why in refusals.items():
        if getattr(config, field):
            raise ValueError(f"Adapter {name!r} has {field}={getattr(config, field)!r}: {why}.")
    if config.task_type == "SEQ_CLS":
        raise ValueError(f"Adapter {name!r} is task_type='SEQ_CLS': its trained copy of the classification head "
                         "cannot be combined; combine adapters without a trained head.")
    if config.init_lora_weights in ("pissa", "olora") or str(config.init_lora_weights).startswith("pissa_niter_"):
        raise ValueError(f"Adapter {name!r} has init_lora_weights={config.init_lora_weights!r}: its B A is relative "
                         "to a changed W₀ (W₀ − s·B₀A₀), so it cannot be added to other adapters' updates.")


def _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_driver,
                     density, majority_sign_method) -> None:
    check_new_name(model, adapter_name)
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights={weights!r}: give one weight per adapter, {len(adapters)} numbers for "
                         f"{list(adapters)}.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights={weights!r}: every weight must be a finite number (negative ones subtract).")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r}: choose one of {list(COMBINATION_TYPES)}.")
    base_method = combination_type.removesuffix("_svd")
    if base_method in NEED_DENSITY:
        if (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1):
            raise ValueError(f"combination_type={combination_type!r} needs density, the share of entries to keep, "
                             f"in (0, 1] (e.g. density=0.5); got {density!r}.")
    elif density is not None:
        raise ValueError(f"density={density!r} is used only by {[*NEED_DENSITY, 'and their _svd forms']}; "
                         f"combination_type={combination_type!r} keeps every entry. Leave density=None.")
    if base_method in ELECT_SIGN:
        if majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method={majority_sign_method!r}: 'total' (the sign of the sum) or "
                             "'frequency' (the sign most adapters have).")
    elif majority_sign_method != "total":
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is used only by ties and dare_ties (and "
                         "their _svd forms); leave it at 'total'.")
    if combination_type in SVD_BASED:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ValueError(f"svd_rank={svd_rank!r}: a positive integer, or None for the largest adapter rank.")
        if svd_clamp is not None and (not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1):
            raise ValueError(f"svd_clamp={svd_clamp!r}: a quantile in [0, 1], or None for no clipping.")
        if svd_driver not in (None, "gesvd", "gesvdj", "gesvda"):
            raise ValueError(f"svd_driver={svd_driver!r}: None, 'gesvd', 'gesvdj' or 'gesvda' (CUDA only).")
    elif (svd_rank, svd_clamp, svd_driver) != (None, None, None):
        raise ValueError(f"svd_rank, svd_clamp and svd_driver are used only by the svd combination types "
                         f"{list(SVD_BASED)}, not by {combination_type!r}; leave them None.")


def _new_rank(combination_type: str, ranks: list[int], svd_rank, adapters, layers_of) -> int:
    if combination_type in FACTOR_WISE:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination_type!r} merges the factors entry by entry, so all "
                             f"adapters need the same rank; {list(adapters)} have r={ranks}. Use "
                             "combination_type='cat' (rank = the sum) or 'svd' (rank = svd_rank) instead.")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    new_rank = svd_rank or max(ranks)
    layer_sizes = {name: min(layer.lora_factors()[1].shape[0], layer.lora_factors()[0].shape[1])
                   for layers in layers_of for name, layer in layers.items()}
    smallest = min(layer_sizes, key=layer_sizes.get)
    if new_rank > layer_sizes[smallest]:
        raise ValueError(f"svd_rank={new_rank} exceeds the rank a ΔW of {smallest} can have "
                         f"(min(d_out, d_in) = {layer_sizes[smallest]}); choose svd_rank <= {layer_sizes[smallest]}.")
    return new_rank


def _union_of_targets(configs: list[LoraConfig], adapters) -> list[str] | str:
    """Every layer any adapter targets: the union of the name lists, or the regexes joined by | (as PEFT)."""
    targets = [config.target_modules for config in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, list) for t in targets):
        return sorted(set().union(*targets))
    raise ValueError(f"Adapters {list(adapters)} give target_modules as {[type(t).__name__ for t in targets]}: PEFT "
                     "cannot join a regex string with a list of names; give all of them as lists (or all as regexes).")
