"""The DoRA chapter's exercise checks (``notebooks/dora.ipynb``): the norm per output feature, the merged
DoRA weight, the forward pass with the norm detached, and the part of the gradient that detaching drops.

Every request draws its shapes from the seed (never square, so a norm over the wrong axis cannot pass by
accident), and the dtype too: float32 for even seeds, float64 for odd ones (the hidden tests' seeds are
odd), so an answer must compute in the dtype it is given (Exercise 4 has a layer of each dtype in every request).

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call.
"""

from __future__ import annotations

import torch

from .core import (Exercise, _answer_kind, _call, _capture, _close64, _fail, _randn, _require_callable, _run, _seed_dtype,
                   _value_of)



def _require_dtype(got: torch.Tensor, given: torch.Tensor, name: str) -> None:
    if got.dtype != given.dtype:
        _fail(f"{name} returned {str(got.dtype).removeprefix('torch.')} for {str(given.dtype).removeprefix('torch.')} "
              "inputs: compute in the dtype you are given (no .float(), no new tensors of the default dtype).")


# --- DoRA chapter: the norm per output feature --------------------------------------------------
def _row_norm_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = 5 + seed % 3, 9 + seed % 4  # never square: the wrong axis gives the wrong shape
    dtype = _seed_dtype(seed)
    return {"W": _randn(g, d_out, d_in, dtype=dtype) * (1 + torch.rand(d_out, 1, generator=g)).to(dtype)}


def _row_norm_probe(weight_norm, q: dict) -> dict:
    observed = _answer_kind(weight_norm)
    if observed["callable"]:
        W = q["W"].clone()
        observed["call"] = _run(weight_norm, W)
        observed["W_after"] = W
    return observed


def _row_norm_judge(q: dict, observed: dict) -> None:
    """``weight_norm(W)`` must be the L2 norm of each row of W (d_out, d_in): one number per output feature."""
    _require_callable(observed, "weight_norm")
    got = _value_of(observed["call"], "weight_norm")
    W = q["W"]
    want = torch.linalg.vector_norm(W, dim=1)
    if _close64(got, want):
        _require_dtype(got, W, "weight_norm")
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"weight_norm should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if not torch.equal(observed["W_after"], W):
        _fail("weight_norm changed W in place; compute the norms without modifying the weight.")
    if _close64(got, torch.linalg.vector_norm(W, dim=0)):
        _fail(f"You took the norm over the wrong axis: one number per input feature (shape {tuple(W.shape[1:])}). "
              f"nn.Linear stores W as (d_out, d_in); DoRA needs one norm per output feature, over d_in (dim=1), "
              f"shape ({W.shape[0]},).")
    if got.numel() == 1 and _close64(got.reshape(()), torch.linalg.vector_norm(W)):
        _fail("You returned the norm of the whole matrix (one number); DoRA needs one norm per output feature (per row).")
    if got.shape == (W.shape[0], 1) and _close64(got.squeeze(1), want):
        _fail(f"Right values, but shape (d_out, 1) = {tuple(got.shape)}: return shape ({W.shape[0]},), "
              "without keepdim (the magnitude vector m has that shape).")
    if _close64(got, want.square()):
        _fail("You returned the squared norms: take the square root (torch.linalg.vector_norm does).")
    if got.shape != want.shape:
        _fail(f"weight_norm should return shape (d_out,) = ({W.shape[0]},), one norm per output feature; yours has {tuple(got.shape)}.")
    _fail("weight_norm(W) does not equal the L2 norm of each row of W, ‖W[i, :]‖₂.")


check_weight_norm = Exercise(
    "function", _row_norm_request, _row_norm_probe, _row_norm_judge,
    doc="``weight_norm(W)`` must be the L2 norm of each row of W (d_out, d_in): one number per output feature.")


# --- DoRA chapter: the merged DoRA weight -------------------------------------------------------
def _dora_weight_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r, dtype = 11 + seed % 3, 6 + seed % 2, 2 + seed % 2, _seed_dtype(seed)
    W0 = _randn(g, d_out, d_in, dtype=dtype)
    return {"W0": W0, "A": _randn(g, r, d_in, dtype=dtype) * 0.5, "B": _randn(g, d_out, r, dtype=dtype) * 0.5,
            "m": torch.linalg.vector_norm(W0, dim=1) * (0.5 + torch.rand(d_out, generator=g)).to(dtype),
            "alpha": 6.0, "r": r}


def _dora_weight_probe(dora_weight, q: dict) -> dict:
    observed = _answer_kind(dora_weight)
    if observed["callable"]:
        W0 = q["W0"].clone()
        observed["call"] = _run(dora_weight, W0, q["A"].clone(), q["B"].clone(), q["m"].clone(), q["alpha"], q["r"])
        observed["W0_after"] = W0
    return observed


def _dora_weight_judge(q: dict, observed: dict) -> None:
    """``dora_weight(W0, A, B, m, alpha, r)`` must be m ⊙ V / ‖V‖ per row, with V = W0 + (alpha/r)·B A."""
    _require_callable(observed, "dora_weight")
    if not torch.equal(observed["W0_after"], q["W0"]):
        _fail("dora_weight changed W0 in place; return a new tensor (e.g. V = W0 + ...), leaving W0 as it was.")
    got = _value_of(observed["call"], "dora_weight")
    W0, A, B, m, alpha, r = q["W0"], q["A"], q["B"], q["m"], q["alpha"], q["r"]

    def direction(scale, dim=1):
        V = W0 + scale * (B @ A)
        return V / torch.linalg.vector_norm(V, dim=dim, keepdim=True)

    V = W0 + (alpha / r) * (B @ A)
    if _close64(got, m[:, None] * direction(alpha / r)):
        _require_dtype(got, W0, "dora_weight")
        return
    if not isinstance(got, torch.Tensor) or got.shape != W0.shape:
        _fail(f"dora_weight should return a tensor of W0's shape {tuple(W0.shape)} (d_out, d_in).")
    if _close64(got, m[:, None] * direction(alpha / r, dim=0)):
        _fail("You normalised over the wrong axis (each column, one norm per input feature). DoRA normalises each "
              "output feature: the norm over d_in, dim=1 of the (d_out, d_in) matrix.")
    if _close64(got, m[:, None] * direction(1.0)):
        _fail("The low-rank update is missing its scaling alpha / r: V = W0 + (alpha/r)·B A.")
    if _close64(got, m[:, None] * direction(alpha)):
        _fail("You scaled BA by alpha; LoRA's (and DoRA's) scaling is alpha / r.")
    if _close64(got, m[:, None] * V / torch.linalg.vector_norm(W0, dim=1, keepdim=True)):
        _fail("You divided by the norm of W0; DoRA divides by the norm of the adapted V = W0 + (alpha/r)·B A, "
              "so that each row of the direction has length 1.")
    if _close64(got, direction(alpha / r)):
        _fail("You returned the direction V/‖V‖ only: multiply each row by its magnitude m.")
    if _close64(got, m[:, None] * V):
        _fail("You did not normalise V: divide each row by its norm before multiplying by m.")
    if _close64(got, V):
        _fail("You returned the LoRA weight W0 + (alpha/r)·B A: DoRA rescales each row to length m.")
    _fail("dora_weight does not equal m ⊙ V / ‖V‖ (per row), V = W0 + (alpha/r)·B A. "
          "m has one entry per output feature: broadcast it over the rows (m[:, None]).")


check_dora_weight = Exercise(
    "function", _dora_weight_request, _dora_weight_probe, _dora_weight_judge,
    doc="``dora_weight(W0, A, B, m, alpha, r)`` must be m ⊙ V / ‖V‖ per row, with V = W0 + (alpha/r)·B A.")


# --- DoRA chapter: the forward pass, with the norm detached --------------------------------------
def _dora_forward_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r, dtype = 10 + seed % 3, 7 + seed % 2, 3 - seed % 2, _seed_dtype(seed)
    batch, tokens = 2 + seed % 2, 4 + seed % 3
    W0 = _randn(g, d_out, d_in, dtype=dtype)
    return {"x": _randn(g, batch, tokens, d_in, dtype=dtype), "W0": W0, "A": _randn(g, r, d_in, dtype=dtype) * 0.5,
            "B": _randn(g, d_out, r, dtype=dtype) * 0.5,
            "m": torch.linalg.vector_norm(W0, dim=1) * (0.5 + torch.rand(d_out, generator=g)).to(dtype),
            "alpha": 4.0, "r": r, "grad_out": _randn(g, batch, tokens, d_out, dtype=dtype)}


def _dora_forward_probe(dora_forward, q: dict) -> dict:
    observed = _answer_kind(dora_forward)
    if not observed["callable"]:
        return observed
    A, B, m = (q[k].clone().requires_grad_(True) for k in ("A", "B", "m"))
    outcome, out = _call(dora_forward, q["x"].clone(), q["W0"].clone(), A, B, m, q["alpha"], q["r"])
    observed["call"] = outcome | {"value": _capture(out)} if outcome["status"] == "ok" else outcome
    if isinstance(out, torch.Tensor) and out.requires_grad and out.shape == q["grad_out"].shape:
        try:
            (out * q["grad_out"]).sum().backward()
        except Exception as error:
            observed["backward_error"] = f"{type(error).__name__}: {error}"[:500]
    observed["grads"] = {k: None if p.grad is None else p.grad.clone() for k, p in (("A", A), ("B", B), ("m", m))}
    return observed


def _dora_forward_reference(q: dict, detach: bool = True) -> tuple[torch.Tensor, dict]:
    A, B, m = (q[k].clone().requires_grad_(True) for k in ("A", "B", "m"))
    V = q["W0"] + (q["alpha"] / q["r"]) * (B @ A)
    norm = torch.linalg.vector_norm(V, dim=1)
    out = q["x"] @ ((m / (norm.detach() if detach else norm))[:, None] * V).T
    (out * q["grad_out"]).sum().backward()
    return out.detach(), {"A": A.grad, "B": B.grad, "m": m.grad}


def _dora_forward_judge(q: dict, observed: dict) -> None:
    """``dora_forward(x, W0, A, B, m, alpha, r)``: x W′ᵀ with W′ the DoRA weight, the norm a constant in backward."""
    _require_callable(observed, "dora_forward")
    got = _value_of(observed["call"], "dora_forward")
    want, grads = _dora_forward_reference(q)
    if not _close64(got, want):
        if not isinstance(got, torch.Tensor):
            _fail(f"dora_forward should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
        if got.shape != want.shape:
            _fail(f"The output should have shape {tuple(want.shape)} (batch, tokens, d_out), yours has {tuple(got.shape)}.")
        x, W0, A, B, m, s = q["x"], q["W0"], q["A"], q["B"], q["m"], q["alpha"] / q["r"]
        V = W0 + s * (B @ A)
        if _close64(got, x @ (m[:, None] * V / torch.linalg.vector_norm(V, dim=0, keepdim=True)).T) or \
                _close64(got, x @ (V / torch.linalg.vector_norm(V, dim=0, keepdim=True)).T * m):
            _fail("You normalised over the wrong axis (one norm per input feature); DoRA takes one norm per output "
                  "feature, over d_in (dim=1 of W0's (d_out, d_in)).")
        V1 = W0 + B @ A
        if _close64(got, x @ (m[:, None] * V1 / torch.linalg.vector_norm(V1, dim=1, keepdim=True)).T):
            _fail("The low-rank update is missing its scaling alpha / r: V = W0 + (alpha/r)·B A.")
        if _close64(got, x @ V.T):
            _fail("Your output is plain LoRA, x (W0 + (alpha/r)·BA)ᵀ: DoRA rescales each output feature by m / ‖V‖.")
        if _close64(got, x @ (V / torch.linalg.vector_norm(V, dim=1, keepdim=True)).T):
            _fail("The magnitude m is missing: multiply each output feature by m.")
        _fail("dora_forward does not equal x W'ᵀ with W' = m ⊙ V / ‖V‖ (one norm per output feature), "
              "V = W0 + (alpha/r)·B A.")
    _require_dtype(got, q["x"], "dora_forward")
    if "backward_error" in observed:
        _fail(f"Backward through your output raised {observed['backward_error']}")
    mine = observed["grads"]
    missing = [k for k in ("A", "B", "m") if mine[k] is None]
    if missing:
        _fail(f"No gradient reaches {', '.join(missing)}: use the tensors that are passed in (no .detach() on them, "
              "no torch.no_grad() around the forward).")
    if _close64(mine["A"], grads["A"]) and _close64(mine["B"], grads["B"]) and _close64(mine["m"], grads["m"]):
        return
    _, through_norm = _dora_forward_reference(q, detach=False)
    if all(_close64(mine[k], through_norm[k]) for k in ("A", "B", "m")):
        _fail("Right output, but the gradient flows through ‖V‖: DoRA treats the norm as a constant in backward "
              "(paper §4.3). Detach it: norm = torch.linalg.vector_norm(V, dim=1).detach().")
    if not _close64(mine["m"], grads["m"]):
        _fail("The gradient reaching m differs from the reference: is m used exactly once, as a factor of each output feature?")
    _fail("The gradients reaching A and B differ from the reference (norm detached, nothing else detached).")


check_dora_forward = Exercise(
    "function", _dora_forward_request, _dora_forward_probe, _dora_forward_judge,
    doc="``dora_forward(x, W0, A, B, m, alpha, r)``: x W′ᵀ with W′ the DoRA weight; the norm is a constant in backward.")


# --- DoRA chapter: what detaching the norm drops from the gradient -----------------------------
def _through_norm_request(seed: int) -> dict:
    """Two layers per seed, float32 and float64, not square, with magnitudes and row norms far from 1."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in (torch.float32, torch.float64):
        d_out, d_in = (int(v) for v in torch.randint(3, 9, (2,), generator=g))
        d_in += d_out  # never square: a norm over the wrong axis cannot pass by accident
        V = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * (0.5 + 2 * torch.rand(d_out, 1, generator=g, dtype=torch.float64))
        m = 0.3 + 3 * torch.rand(d_out, generator=g, dtype=torch.float64)
        G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) + 0.8 * V  # rows partly along V: the term is not small
        cases.append({"V": V.to(dtype), "m": m.to(dtype), "G": G.to(dtype)})
    return {"cases": cases}


def _through_norm_probe(gradient_through_norm, q: dict) -> dict:
    observed = _answer_kind(gradient_through_norm)
    if observed["callable"]:
        observed["calls"] = []
        for case in q["cases"]:
            V, m, G = case["V"].clone(), case["m"].clone(), case["G"].clone()
            call = _run(gradient_through_norm, V, m, G)
            call["unchanged"] = torch.equal(V, case["V"]) and torch.equal(m, case["m"]) and torch.equal(G, case["G"])
            observed["calls"].append(call)
    return observed


def _through_norm_terms(V, m, G, dim=1) -> dict:
    """The exact ∂L/∂V of W' = m ⊙ V/‖V‖ for ∂L/∂W' = G, split into its two parts (in float64)."""
    V, m, G = V.double(), m.double(), G.double()
    norm = torch.linalg.vector_norm(V, dim=dim, keepdim=True)
    unit = V / norm
    scale = m[:, None] / torch.linalg.vector_norm(V, dim=1, keepdim=True)
    along = (G * unit).sum(dim=dim, keepdim=True) * unit  # ⟨Gᵢ, v̂ᵢ⟩ v̂ᵢ: G's component along each row
    return {"detached": scale * G, "through_norm": -scale * along, "along": along, "scale": scale,
            "unnormalised": -scale * (G * V).sum(dim=dim, keepdim=True) * V}


def _through_norm_judge(q: dict, observed: dict) -> None:
    """``gradient_through_norm(V, m, G)``: the part of ∂L/∂V that flows through ‖V‖ (exact minus detached)."""
    _require_callable(observed, "gradient_through_norm")
    for case, call in zip(q["cases"], observed["calls"]):
        V, m, G = case["V"], case["m"], case["G"]
        got = _value_of(call, "gradient_through_norm")
        where = f"For V of shape {tuple(V.shape)} ({str(V.dtype).removeprefix('torch.')})"
        if not call["unchanged"]:
            _fail(f"{where}, gradient_through_norm changed V, m or G in place; compute on copies (or out of place).")
        terms = _through_norm_terms(V, m, G)
        want = terms["through_norm"]

        def matches(reference):  # up to rounding, relative to the largest entry (some entries are near zero)
            return _close64(got, reference, atol=1e-6 * float(reference.abs().max()))

        if matches(want):
            _require_dtype(got, V, "gradient_through_norm")
            continue
        if not isinstance(got, torch.Tensor):
            _fail(f"gradient_through_norm should return a tensor, it returned "
                  f"{got.get('type') if isinstance(got, dict) else type(got).__name__}.")
        if got.shape != V.shape:
            _fail(f"{where} the answer has V's shape {tuple(V.shape)} (one gradient entry per entry of V); "
                  f"yours has {tuple(got.shape)}.")
        if torch.count_nonzero(got) == 0:
            _fail(f"{where} you return zeros, as if detaching changed nothing. The exact gradient also flows through "
                  "‖V‖: differentiate W' = m ⊙ V/‖V‖ with the norm a function of V, and compare with the norm held fixed.")
        if matches(-want):
            _fail(f"{where} your answer has the wrong sign: return the exact gradient minus the detached one.")
        if matches(terms["detached"]):
            _fail(f"{where} you return the detached gradient (m/‖V‖)·G, what DoRA computes; the question is the part it "
                  "drops: the exact gradient minus that.")
        if matches(terms["detached"] + want):
            _fail(f"{where} you return the whole exact gradient; return only its part through the norm "
                  "(exact minus detached).")
        if matches(-terms["along"]) or matches(terms["along"]):
            _fail(f"{where} the direction is right, but the factor m/‖V‖ that scales every gradient reaching V is "
                  "missing (W' = (m/‖V‖)·V, row by row).")
        if matches(terms["unnormalised"]):
            _fail(f"{where} you projected on the row V itself instead of its unit direction V/‖V‖: "
                  "the result is ‖V‖² too large.")
        if matches(_through_norm_terms(V, m, G, dim=0)["through_norm"]):
            _fail(f"{where} you normalised over the wrong axis (columns); DoRA's norm is one per output feature, "
                  "over d_in (each row of V).")
        _fail(f"{where} gradient_through_norm(V, m, G) is not the part of ∂L/∂V that flows through ‖V‖. "
              "Compute ∂L/∂V twice, with the norm as a function of V and with it detached, and subtract.")


check_gradient_through_norm = Exercise(
    "function", _through_norm_request, _through_norm_probe, _through_norm_judge,
    doc="``gradient_through_norm(V, m, G)``: the part of ∂L/∂V that flows through ‖V‖ (exact minus detached).")
