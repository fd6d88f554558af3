"""The exercise checks of "One base model, many tasks" (``notebooks/many_tasks.ipynb``): one layer of a mixed-adapter
batch (gather each row's factors, then batched products), PEFT's ``linear`` combination of two or more LoRA
adapters (the weight split as a square root over the two factors), and TIES' sign election.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call. Every seed draws new values; the shapes (batch,
tokens, widths, rank, number of adapters) and the dtypes (float32, float64, bfloat16) vary with the seed, so an
answer fitted to the public test fails a hidden one. The references are the code the chapter shows to equal PEFT:
``mixed_batch.MixedBatchLora`` and ``adapter_arithmetic`` (``_factor_wise``, ``agrees_with_elected_sign``).
"""

from __future__ import annotations

import math

import torch

from ..adapter_arithmetic import agrees_with_elected_sign
from .core import Exercise, _fail, _probe_each_case, _require_callable, _value_of

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2}  # relative to the largest entry


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor(got, what: str, args: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"For {args}, {what} returned a {kind}; return a torch.Tensor.")
    return got


def _same(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal to the tolerance of ``dtype``, measured against the largest entry of the reference."""
    if got.shape != want.shape:
        return False
    scale = want.double().abs().max().clamp(min=1e-12)
    return bool(((got.double() - want.double()).abs().max() / scale) <= _TOLERANCE[dtype])


def _check_result(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, args: str) -> None:
    """Shape and dtype first, with their own messages."""
    if got.shape != want.shape:
        _fail(f"For {args}, {what} returned shape {tuple(got.shape)}; the result has shape {tuple(want.shape)}.")
    if got.dtype != dtype:
        _fail(f"For {args}, {what} returned {_name(got.dtype)}; keep the inputs' dtype, {_name(dtype)}.")


# --- Exercise 1: one layer of a mixed-adapter batch ----------------------------------------------------------
def mixed_layer_reference(x, weight, A, B, scaling, adapter_of_row):
    """x W₀ᵀ + s·(x A_{a(i)}ᵀ) B_{a(i)}ᵀ for each row i, computed in float64."""
    x64 = x.double()
    shrunk = torch.bmm(x64, A.double()[adapter_of_row].transpose(1, 2))
    return x64 @ weight.double().T + scaling * torch.bmm(shrunk, B.double()[adapter_of_row].transpose(1, 2))


def _mixed_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(3):
        adapters, rank = 2 + (seed + i) % 3, 1 + (seed + 2 * i) % 4
        batch, tokens = 4 + (seed + i) % 3, 1 + (seed + 3 * i) % 5
        d_in, d_out = 6 + (seed * 3 + i) % 7, 5 + (seed + 5 * i) % 6
        dtype = _DTYPES[(seed + i) % 3]
        rows = torch.randint(adapters, (batch,), generator=g)
        rows[:2] = torch.tensor([adapters - 1, 0])  # the rows do not follow the adapters' order
        cases.append({
            "x": torch.randn(batch, tokens, d_in, generator=g).to(dtype),
            "weight": (torch.randn(d_out, d_in, generator=g) * 0.3).to(dtype),
            "A": torch.randn(adapters, rank, d_in, generator=g).to(dtype),
            "B": torch.randn(adapters, d_out, rank, generator=g).to(dtype),
            "scaling": [0.5, 2.0, 1.5][(seed + i) % 3],
            "adapter_of_row": rows,
        })
    return {"cases": cases}


_MIXED_ARGS = ("x", "weight", "A", "B", "scaling", "adapter_of_row")


def _mixed_probe(mixed_lora_layer, request: dict) -> dict:
    return _probe_each_case(mixed_lora_layer, request["cases"], lambda case: [
        case[k].clone() if isinstance(case[k], torch.Tensor) else case[k] for k in _MIXED_ARGS])


def _mixed_judge(request: dict, observed: dict) -> None:
    """``mixed_lora_layer(x, weight, A, B, scaling, adapter_of_row)``: row i through adapter adapter_of_row[i]."""
    _require_callable(observed, "mixed_lora_layer")
    for case, call in zip(request["cases"], observed["calls"]):
        x, W, A, B, s, rows = (case[k] for k in _MIXED_ARGS)
        dtype = x.dtype
        args = (f"x of {tuple(x.shape)} {_name(dtype)}, {A.shape[0]} adapters of rank {A.shape[1]} and "
                f"adapter_of_row={rows.tolist()}")
        got = _tensor(_value_of(call, "mixed_lora_layer"), "mixed_lora_layer", args)
        want = mixed_layer_reference(x, W, A, B, s, rows)
        _check_result(got, want, dtype, "mixed_lora_layer", args)
        if _same(got, want, dtype):
            continue
        first = torch.zeros_like(rows)
        base = x.double() @ W.double().T
        if _same(got, mixed_layer_reference(x, W, A, B, s, first), dtype):
            _fail(f"For {args}: every row went through adapter 0. Gather each row's factors with its own index, "
                  "A[adapter_of_row] and B[adapter_of_row].")
        if _same(got, mixed_layer_reference(x, W, A, B, s, torch.arange(len(rows)) % A.shape[0]), dtype):
            _fail(f"For {args}: row i went through adapter i (by position); it should go through adapter "
                  "adapter_of_row[i]. Index A and B with adapter_of_row.")
        if _same(got, mixed_layer_reference(x, W, A, B, 1.0, rows), dtype):
            _fail(f"For {args}: the update is not multiplied by scaling; the output is x W₀ᵀ + scaling·(x Aᵀ) Bᵀ.")
        if _same(got, mixed_layer_reference(x, W * 0, A, B, s, rows), dtype):
            _fail(f"For {args}: the frozen layer's output x W₀ᵀ is missing; add the update to it.")
        if _same(got, base, dtype):
            _fail(f"For {args}: the result is the base layer's x W₀ᵀ alone; add each row's LoRA update.")
        every = base + sum(mixed_layer_reference(x, W * 0, A, B, s, torch.full_like(rows, a))
                           for a in range(A.shape[0]))
        if _same(got, every, dtype):
            _fail(f"For {args}: every row got the updates of all adapters added; each row gets only its own "
                  "adapter's, A[adapter_of_row[i]] and B[adapter_of_row[i]].")
        worst = (got.double() - want).abs().amax(dim=(1, 2))
        wrong_rows = [i for i, value in enumerate(worst.tolist()) if value > _TOLERANCE[dtype] * want.abs().max()]
        _fail(f"For {args}, mixed_lora_layer gives other values in rows {wrong_rows}. Row i is "
              "x_i W₀ᵀ + scaling·(x_i A_{a(i)}ᵀ) B_{a(i)}ᵀ with a(i) = adapter_of_row[i].")


check_mixed_lora_layer = Exercise(
    "function", _mixed_request, _mixed_probe, _mixed_judge,
    doc="``mixed_lora_layer(x, weight, A, B, scaling, adapter_of_row)``: x W₀ᵀ + s·(x Aᵀ_{a(i)}) Bᵀ_{a(i)} per row.")


# --- Exercise 2: PEFT's linear combination -------------------------------------------------------------------
def linear_delta_reference(As, Bs, scalings, weights):
    """B'A' with A' = Σ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ and B' = Σ √|wᵢsᵢ| Bᵢ, in float64."""
    products = [float(w) * float(s) for w, s in zip(weights, scalings)]
    on_A = torch.tensor([math.copysign(math.sqrt(abs(p)), p) for p in products], dtype=torch.float64)
    on_B = torch.tensor([math.sqrt(abs(p)) for p in products], dtype=torch.float64)
    A = (As.double() * on_A.view(-1, 1, 1)).sum(0)
    B = (Bs.double() * on_B.view(-1, 1, 1)).sum(0)
    return B @ A


def _linear_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(3):
        adapters, rank = 2 + (seed + i) % 2, 2 + (seed + i) % 3
        d_in, d_out = 5 + (seed + 2 * i) % 6, 4 + (seed * 5 + i) % 7
        dtype = _DTYPES[(seed + i) % 3]
        weights = torch.rand(adapters, generator=g) + 0.3
        weights[1] = -weights[1]  # a subtracted adapter: the sign goes on A only
        cases.append({  # weights and scalings in the factors' dtype, so that the result keeps it
            "As": torch.randn(adapters, rank, d_in, generator=g).to(dtype),
            "Bs": torch.randn(adapters, d_out, rank, generator=g).to(dtype),
            "scalings": (torch.tensor([2.0, 0.5, 1.5])[:adapters] * (1 + seed % 3)).to(dtype),
            "weights": weights.to(dtype),
        })
    return {"cases": cases}


_LINEAR_ARGS = ("As", "Bs", "scalings", "weights")


def _linear_probe(linear_delta, request: dict) -> dict:
    return _probe_each_case(linear_delta, request["cases"], lambda case: [case[k].clone() for k in _LINEAR_ARGS])


def _linear_judge(request: dict, observed: dict) -> None:
    """``linear_delta(As, Bs, scalings, weights)``: B′A′ of PEFT's ``combination_type="linear"``."""
    _require_callable(observed, "linear_delta")
    for case, call in zip(request["cases"], observed["calls"]):
        As, Bs, s, w = (case[k] for k in _LINEAR_ARGS)
        dtype = As.dtype
        args = (f"{As.shape[0]} adapters of rank {As.shape[1]} ({_name(dtype)}), weights "
                f"{[round(v, 3) for v in w.tolist()]}, scalings {s.tolist()}")
        got = _tensor(_value_of(call, "linear_delta"), "linear_delta", args)
        want = linear_delta_reference(As, Bs, s, w)
        _check_result(got, want, dtype, "linear_delta", args)
        if _same(got, want, dtype):
            continue
        exact = sum(float(wi) * float(si) * Bs[i].double() @ As[i].double() for i, (wi, si) in enumerate(zip(w, s)))
        if _same(got, exact, dtype):
            _fail(f"For {args}: that is Σ wᵢ sᵢ BᵢAᵢ, the exact sum of the updates (what 'cat' gives). 'linear' "
                  "combines the factors, A' = Σ aᵢAᵢ and B' = Σ bᵢBᵢ, and returns B'A', cross terms included.")
        if _same(got, linear_delta_reference(As, Bs, torch.ones_like(s), w), dtype):
            _fail(f"For {args}: the adapters' scalings sᵢ are left out; split wᵢ·sᵢ, not wᵢ alone.")
        if _same(got, linear_delta_reference(As, Bs, s, w.abs()), dtype):
            _fail(f"For {args}: the negative weight was taken as positive; put the sign of wᵢsᵢ on A's share.")
        products = w.double() * s.double()
        both_signed = ((Bs.double() * (products.sign() * products.abs().sqrt()).view(-1, 1, 1)).sum(0)
                       @ (As.double() * (products.sign() * products.abs().sqrt()).view(-1, 1, 1)).sum(0))
        if _same(got, both_signed, dtype):
            _fail(f"For {args}: the sign of wᵢsᵢ is on both factors, so a negative weight cancels out in BᵢAᵢ; "
                  "put it on A's share only, bᵢ = √|wᵢsᵢ|.")
        full_both = (Bs.double() * products.view(-1, 1, 1)).sum(0) @ (As.double() * products.view(-1, 1, 1)).sum(0)
        full_A = Bs.double().sum(0) @ (As.double() * products.view(-1, 1, 1)).sum(0)
        if _same(got, full_both, dtype) or _same(got, full_A, dtype):
            _fail(f"For {args}: wᵢsᵢ is not split as a square root; A gets sign(wᵢsᵢ)·√|wᵢsᵢ| and B gets "
                  "√|wᵢsᵢ|, so that each BᵢAᵢ is scaled by wᵢsᵢ once.")
        _fail(f"For {args}, linear_delta gives other values. A' = Σ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ, B' = Σ √|wᵢsᵢ| Bᵢ; "
              "return B' @ A'.")


check_linear_delta = Exercise(
    "function", _linear_request, _linear_probe, _linear_judge,
    doc="``linear_delta(As, Bs, scalings, weights)``: B′A′, A′ = Σ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ, B′ = Σ √|wᵢsᵢ| Bᵢ.")


# --- Exercise 3: TIES' sign election -------------------------------------------------------------------------
def _sign_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(3):
        adapters = 3 + (seed + i) % 3
        shape = [(4, 5), (3 + seed % 4, 2, 3), (6 + (seed + i) % 5,)][i]
        dtype = _DTYPES[(seed + i) % 3]
        # multiples of 1/4 below 2⁸/4 in every sum: exact in bfloat16 too, so the elected sign does not depend on
        # the order or the precision of the summation
        stacked = torch.randint(-20, 21, (adapters, *shape), generator=g) * 0.25
        stacked[0] = stacked[0] * 3  # one adapter large: its sign wins entries where the others outvote it
        stacked = stacked * (torch.rand(adapters, *shape, generator=g) > 0.3)  # pruned entries are 0
        flat = stacked.view(adapters, -1)
        flat[:, 0] = torch.tensor([1.0, -1.0] + [0.0] * (adapters - 2))  # a tie: the sum is exactly 0
        flat[:, 1] = 0.0  # an entry every adapter pruned
        cases.append({"stacked": stacked.to(dtype)})
    return {"cases": cases}


def _sign_probe(agrees_with_sign, request: dict) -> dict:
    return _probe_each_case(agrees_with_sign, request["cases"], lambda case: (case["stacked"].clone(),))


def _sign_judge(request: dict, observed: dict) -> None:
    """``agrees_with_sign(stacked)``: True where an entry's sign is the one elected by total mass (+ on a tie)."""
    _require_callable(observed, "agrees_with_sign")
    for case, call in zip(request["cases"], observed["calls"]):
        stacked = case["stacked"]
        args = f"stacked of {tuple(stacked.shape)} {_name(stacked.dtype)}"
        got = _tensor(_value_of(call, "agrees_with_sign"), "agrees_with_sign", args)
        want = agrees_with_elected_sign(stacked.double(), "total")
        if got.shape == want.shape[1:]:
            _fail(f"For {args}, agrees_with_sign returned shape {tuple(got.shape)}, one value per entry (the elected "
                  f"sign?); return the mask of shape {tuple(want.shape)}: for each adapter, whether it agrees.")
        if got.shape != want.shape:
            _fail(f"For {args}, agrees_with_sign returned shape {tuple(got.shape)}; return a mask of the shape of "
                  f"stacked, {tuple(want.shape)}.")
        if got.dtype != torch.bool:
            _fail(f"For {args}, agrees_with_sign returned {_name(got.dtype)}; return a torch.bool mask.")
        if torch.equal(got, want):
            continue
        signs = stacked.double().sign()
        votes = stacked.double().sum(0)
        if torch.equal(got, agrees_with_elected_sign(stacked.double(), "frequency")):
            _fail(f"For {args}: the sign was elected by counting the adapters' signs; elect it by total mass, "
                  "the sign of the sum of the entries, so that one large entry can outweigh several small ones.")
        if torch.equal(got, signs == torch.where(votes > 0, 1, -1)):
            _fail(f"For {args}: where the entries sum to exactly 0 you elect −1; TIES (and PEFT) elect +1 on a tie.")
        if torch.equal(got, signs == votes.sign()):
            _fail(f"For {args}: where the entries sum to exactly 0, sign() gives 0 and no adapter agrees; elect +1 "
                  "on a tie.")
        if torch.equal(got, (stacked >= 0) == (votes >= 0)):
            _fail(f"For {args}: a pruned entry (0) counts as agreeing; an entry agrees only if its sign, +1 or −1, "
                  "is the elected one (sign(0) = 0 agrees with neither).")
        wrong = int((got != want).sum())
        _fail(f"For {args}, agrees_with_sign differs at {wrong} of {want.numel()} entries. Elect σ = sign(Σᵢ Tᵢ) per "
              "entry (+1 where the sum is 0) and return sign(Tᵢ) == σ.")


check_agrees_with_sign = Exercise(
    "function", _sign_request, _sign_probe, _sign_judge,
    doc="``agrees_with_sign(stacked)``: sign(Tᵢ) == σ with σ = sign(Σᵢ Tᵢ), +1 where the sum is 0 (bool mask).")
