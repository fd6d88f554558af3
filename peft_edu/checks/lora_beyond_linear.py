"""The exercise checks of "LoRA beyond nn.Linear" (``notebooks/lora_beyond_linear.ipynb``): LoRA's lookup on an
embedding table, merging LoRA into a transposed (GPT-2 ``Conv1D``) weight, and the residual weight PiSSA leaves.

Every request draws its shapes from the seed, and the dtype too: float32 for even seeds, float64 for odd ones
(the hidden tests' seeds are odd), so an answer must compute in the dtype it is given. Shapes are never square
where a transposition could pass by accident (Exercise 2 has one square layer on purpose: GPT-2's ``c_proj`` is
square, and there a forgotten transposition gives wrong numbers instead of an error); Exercise 2 has a layer of
each dtype in every request, and so has Exercise 3.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call.
"""

from __future__ import annotations

import torch

from .core import Exercise, _answer_kind, _close64, _fail, _randn, _require_callable, _run, _seed_dtype, _value_of



def _type_name(value) -> str:
    return value.get("type", "?") if isinstance(value, dict) else type(value).__name__


def _require_dtype(got: torch.Tensor, given: torch.Tensor, name: str) -> None:
    if got.dtype != given.dtype:
        _fail(f"{name} returned {str(got.dtype).removeprefix('torch.')} for {str(given.dtype).removeprefix('torch.')} "
              "inputs: compute in the dtype you are given (no .float(), no new tensors of the default dtype).")


# --- Exercise 1: LoRA's lookup on an embedding table ------------------------------------------------
def _embedding_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab, dim, r, dtype = 40 + 3 * (seed % 5), 6 + seed % 3, 2 + seed % 3, _seed_dtype(seed)
    batch, length = 2 + seed % 2, 5 + seed % 3
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    tokens[0, 0] = vocab - 1  # a token id above dim: looking up rows of the dense (dim × vocab) ΔW fails
    scaling = (0.5, 0.75, 1.5, 2.0)[seed % 4]  # never 1, so that a missing scaling shows
    return {"tokens": tokens, "table": _randn(g, vocab, dim, dtype=dtype), "A": _randn(g, r, vocab, dtype=dtype),
            "B": _randn(g, dim, r, dtype=dtype), "scaling": scaling}


def _embedding_probe(embedding_lora_forward, q: dict) -> dict:
    observed = _answer_kind(embedding_lora_forward)
    if observed["callable"]:
        tokens, table, A, B = q["tokens"].clone(), q["table"].clone(), q["A"].clone(), q["B"].clone()
        observed["call"] = _run(embedding_lora_forward, tokens, table, A, B, q["scaling"])
        observed["unchanged"] = (torch.equal(tokens, q["tokens"]) and torch.equal(table, q["table"])
                                 and torch.equal(A, q["A"]) and torch.equal(B, q["B"]))
    return observed


def _embedding_judge(q: dict, observed: dict) -> None:
    """``embedding_lora_forward(tokens, table, A, B, scaling)``: table[t] + scaling · B A[:, t] for every token t."""
    _require_callable(observed, "embedding_lora_forward")
    got = _value_of(observed["call"], "embedding_lora_forward")
    tokens, table, A, B, s = q["tokens"], q["table"], q["A"], q["B"], q["scaling"]
    lookup, update = table[tokens], A.T[tokens] @ B.T
    if not observed["unchanged"]:
        _fail("embedding_lora_forward changed one of its inputs in place; return a new tensor.")
    if _close64(got, lookup + s * update):
        _require_dtype(got, table, "embedding_lora_forward")
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"embedding_lora_forward should return a tensor, it returned {_type_name(got)}.")
    want_shape = (*tokens.shape, table.shape[1])
    if tuple(got.shape) != want_shape:
        _fail(f"The output should have shape {want_shape} (batch, tokens, dim): one embedding per token; "
              f"yours has {tuple(got.shape)}.")
    if _close64(got, lookup):
        _fail("You returned the frozen lookup table[tokens] only: add the low-rank update scaling · B A[:, t]. "
              "(With random A and B it is not zero; at PEFT's initialisation, A = 0, it would be.)")
    if _close64(got, s * update):
        _fail("You returned the update scaling · B A[:, t] only: the frozen row table[t] is still there; add it.")
    if _close64(got, lookup + update):
        _fail("The update is missing its scaling: table[t] + scaling · B A[:, t].")
    if _close64(got, s * (lookup + update)):
        _fail("You scaled the frozen lookup too: only the update is multiplied by scaling.")
    _fail("embedding_lora_forward does not equal table[t] + scaling · B A[:, t]. Token t selects column t of "
          "A (shape (r, vocab)), i.e. row t of Aᵀ; B (dim, r) then maps it to the embedding's dim.")


check_embedding_lora_forward = Exercise(
    "function", _embedding_request, _embedding_probe, _embedding_judge,
    doc="``embedding_lora_forward(tokens, table, A, B, scaling)``: table[t] + scaling · B A[:, t] for each token t.")


# --- Exercise 2: merging LoRA into a Conv1D (transposed) weight --------------------------------------
def _conv1d_request(seed: int) -> dict:
    """Two layers: GPT-2's c_proj shape (square) and c_attn's (d_out = 3 d_in), one float32 and one float64."""
    g = torch.Generator().manual_seed(seed)
    cases, d_model, r = [], 4 + seed % 4, 1 + seed % 3
    dtypes = (_seed_dtype(seed), _seed_dtype(seed + 1))
    # the square layer first: there a forgotten transposition runs, and the feedback can name it
    for (d_in, d_out), dtype in zip(((d_model, d_model), (d_model, 3 * d_model)), dtypes):
        cases.append({"weight": _randn(g, d_in, d_out, dtype=dtype), "A": _randn(g, r, d_in, dtype=dtype),
                      "B": _randn(g, d_out, r, dtype=dtype), "scaling": (2.0, 0.5, 1.5)[seed % 3]})
    return {"cases": cases}


def _conv1d_probe(merge_conv1d, q: dict) -> dict:
    observed = _answer_kind(merge_conv1d)
    if observed["callable"]:
        observed["calls"] = []
        for case in q["cases"]:
            weight, A, B = case["weight"].clone(), case["A"].clone(), case["B"].clone()
            call = _run(merge_conv1d, weight, A, B, case["scaling"])
            call["unchanged"] = all(torch.equal(now, before) for now, before in
                                    ((weight, case["weight"]), (A, case["A"]), (B, case["B"])))
            observed["calls"].append(call)
    return observed


def _conv1d_judge(q: dict, observed: dict) -> None:
    """``merge_conv1d(weight, A, B, scaling)``: the merged Conv1D weight (d_in, d_out), weight + scaling · (BA)ᵀ."""
    _require_callable(observed, "merge_conv1d")
    for case, call in zip(q["cases"], observed["calls"]):
        weight, A, B, s = case["weight"], case["A"], case["B"], case["scaling"]
        where = f"For a Conv1D weight of shape {tuple(weight.shape)} (d_in, d_out) and r={A.shape[0]}"
        if not call["unchanged"]:
            _fail(f"{where}, merge_conv1d changed its inputs in place; return a new tensor (the caller's weight "
                  "stays the frozen W₀ until it decides to write the merged one).")
        got = _value_of(call, "merge_conv1d")
        delta = B @ A  # (d_out, d_in): nn.Linear's layout
        if _close64(got, weight + s * delta.T):
            _require_dtype(got, weight, "merge_conv1d")
            continue
        if not isinstance(got, torch.Tensor):
            _fail(f"merge_conv1d should return a tensor, it returned {_type_name(got)}.")
        if weight.shape[0] == weight.shape[1] and _close64(got, weight + s * delta):
            _fail(f"{where}, you added s·BA as it is: that is nn.Linear's layout (d_out, d_in). Conv1D stores Wᵀ, "
                  "so its update is (s·BA)ᵀ. (On a square layer like GPT-2's c_proj this runs and gives wrong numbers.)")
        if tuple(got.shape) == tuple(weight.T.shape) and _close64(got, weight.T + s * delta):
            _fail(f"{where}, you returned the merged weight in nn.Linear's layout {tuple(weight.T.shape)}; "
                  f"Conv1D keeps (d_in, d_out) = {tuple(weight.shape)}: transpose it back.")
        if tuple(got.shape) != tuple(weight.shape):
            _fail(f"{where}, the merged weight has the Conv1D weight's shape {tuple(weight.shape)}; yours has "
                  f"{tuple(got.shape)}.")
        if _close64(got, weight + delta.T):
            _fail(f"{where}, the update is missing its scaling: weight + scaling · (BA)ᵀ.")
        if _close64(got, weight - s * delta.T):
            _fail(f"{where}, you subtracted the update: that is unmerging. Merging adds scaling · (BA)ᵀ.")
        _fail(f"{where}, merge_conv1d does not equal weight + scaling · (BA)ᵀ.")


check_merge_conv1d = Exercise(
    "function", _conv1d_request, _conv1d_probe, _conv1d_judge,
    doc="``merge_conv1d(weight, A, B, scaling)``: the merged Conv1D weight (d_in, d_out), weight + scaling · (BA)ᵀ.")


# --- Exercise 3: PiSSA's residual ------------------------------------------------------------------
def _pissa_request(seed: int) -> dict:
    """Two weights (float32 and float64) with known, well separated singular values, so that the top-r part is
    unique, and never square."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in (_seed_dtype(seed), _seed_dtype(seed + 1)):
        d_out, d_in = (int(v) for v in torch.randint(5, 9, (2,), generator=g))
        d_in += d_out  # never square: an SVD of Wᵀ, or a residual of the wrong shape, cannot pass by accident
        r = int(torch.randint(1, 4, (1,), generator=g))
        U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
        singular = 3.0 * 0.7 ** torch.arange(d_out, dtype=torch.float64) + 0.05  # gaps of at least 30 %
        cases.append({"W": (U @ torch.diag(singular) @ V[:, :d_out].T).to(dtype), "r": r})
    return {"cases": cases}


def _pissa_probe(pissa_residual, q: dict) -> dict:
    observed = _answer_kind(pissa_residual)
    if observed["callable"]:
        observed["calls"] = []
        for case in q["cases"]:
            W = case["W"].clone()
            call = _run(pissa_residual, W, case["r"])
            call["unchanged"] = torch.equal(W, case["W"])
            observed["calls"].append(call)
    return observed


def _top(W: torch.Tensor, r: int, bottom: bool = False, with_values: bool = True) -> torch.Tensor:
    """The rank-r part of W along its r largest (or smallest) singular directions, in float64."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    pick = slice(len(S) - r, len(S)) if bottom else slice(0, r)
    return U[:, pick] @ torch.diag(S[pick] if with_values else torch.ones_like(S[pick])) @ Vh[pick]


def _pissa_judge(q: dict, observed: dict) -> None:
    """``pissa_residual(W, r)``: the frozen weight PiSSA leaves, W − U_r diag(S_r) V_rᵀ (W minus its top-r part)."""
    _require_callable(observed, "pissa_residual")
    for case, call in zip(q["cases"], observed["calls"]):
        W, r = case["W"], case["r"]
        where = f"For W of shape {tuple(W.shape)} ({str(W.dtype).removeprefix('torch.')}) and r={r}"
        if not call["unchanged"]:
            _fail(f"{where}, pissa_residual changed W in place; return the residual as a new tensor (the caller "
                  "decides when to write it into the layer).")
        got = _value_of(call, "pissa_residual")
        tol = {"atol": 1e-4 * float(W.abs().max()), "rtol": 1e-4}
        top = _top(W, r)
        if _close64(got, W.double() - top, **tol):
            _require_dtype(got, W, "pissa_residual")
            continue
        if not isinstance(got, torch.Tensor):
            _fail(f"pissa_residual should return a tensor, it returned {_type_name(got)}.")
        if tuple(got.shape) != tuple(W.shape):
            _fail(f"{where}, the residual replaces W in the layer, so it has W's shape {tuple(W.shape)}; yours has "
                  f"{tuple(got.shape)}.")
        if _close64(got, W, **tol):
            _fail(f"{where}, you returned W itself: subtract its top-r part (which moves into s·BA), or the model "
                  "would count that part twice.")
        if _close64(got, top, **tol):
            _fail(f"{where}, you returned the top-r part U_r diag(S_r) V_rᵀ: that is what s·B₀A₀ holds. The residual "
                  "is what is left, W minus it.")
        if _close64(got, W.double() - _top(W, r, bottom=True), **tol):
            _fail(f"{where}, you removed the r smallest singular directions (torch.linalg.svd sorts them largest "
                  "first: take the first r). PiSSA trains the principal ones and freezes the rest.")
        if _close64(got, W.double() - _top(W, r, with_values=False), **tol):
            _fail(f"{where}, you subtracted U_r V_rᵀ without the singular values: the top-r part is "
                  "U_r diag(S_r) V_rᵀ.")
        _fail(f"{where}, pissa_residual(W, r) does not equal W − U_r diag(S_r) V_rᵀ, W minus its best rank-r "
              "approximation.")


check_pissa_residual = Exercise(
    "function", _pissa_request, _pissa_probe, _pissa_judge,
    doc="``pissa_residual(W, r)``: the frozen weight PiSSA leaves, W − U_r diag(S_r) V_rᵀ (W minus its top-r part).")
