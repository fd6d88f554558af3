"""The LoRA chapter's exercise checks (``notebooks/lora.ipynb``): the trainable parameter count, the forward
pass, merging, a LoRA module, and one gradient step from an initialisation.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora import LoraLinear
from .core import Exercise, _answer_kind, _call, _capture, _close, _fail, _require_callable, _run, _value_of


# --- LoRA chapter: parameter count --------------------------------------------------------------
def _param_count_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    random_shapes = [[int(v) for v in torch.randint(2, 2048, (2,), generator=g)] + [int(torch.randint(1, 64, (1,), generator=g))]
                     for _ in range(3)]
    return {"shapes": [[384, 384, 8], [384, 1536, 4], [576, 192, 16]] + random_shapes}


def _param_count_probe(lora_param_count, request: dict) -> dict:
    observed = _answer_kind(lora_param_count)
    if observed["callable"]:
        observed["calls"] = [_run(lora_param_count, *shape) for shape in request["shapes"]]
    return observed


def _param_count_judge(request: dict, observed: dict) -> None:
    """``lora_param_count(d_in, d_out, r)`` must be r·(d_in + d_out), for square and non-square layers."""
    _require_callable(observed, "lora_param_count")
    for (d_in, d_out, r), call in zip(request["shapes"], observed["calls"]):
        got = _value_of(call, "lora_param_count")
        want = r * (d_in + d_out)
        if got == want:
            continue
        if got == 2 * r * d_in or got == 2 * r * d_out:
            _fail(f"For d_in={d_in}, d_out={d_out}, r={r} you return {got} = 2·r·d, which is right only for square "
                  "layers. A is r×d_in and B is d_out×r: count each one.")
        if got == d_in * d_out:
            _fail(f"You return d_in·d_out = {got}: that is the frozen W₀, not the trainable LoRA factors.")
        _fail(f"For d_in={d_in}, d_out={d_out}, r={r} the answer is not {got!r}. How many entries do A (r×d_in) "
              "and B (d_out×r) have together?")


check_lora_param_count = Exercise(
    "function", _param_count_request, _param_count_probe, _param_count_judge,
    doc="``lora_param_count(d_in, d_out, r)`` must be r·(d_in + d_out), for square and non-square layers.")


# --- LoRA chapter: the forward pass -------------------------------------------------------------
def _forward_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r = 12, 7, 3  # not square: a missing transpose cannot pass by accident
    return {"x": torch.randn(2, 5, d_in, generator=g), "W0": torch.randn(d_out, d_in, generator=g),
            "A": torch.randn(r, d_in, generator=g), "B": torch.randn(d_out, r, generator=g), "alpha": 6.0, "r": r}


def _forward_probe(lora_forward, q: dict) -> dict:
    observed = _answer_kind(lora_forward)
    if observed["callable"]:
        observed["call"] = _run(lora_forward, q["x"].clone(), q["W0"].clone(), q["A"].clone(), q["B"].clone(), q["alpha"], q["r"])
    return observed


def _forward_judge(q: dict, observed: dict) -> None:
    """``lora_forward(x, W0, A, B, alpha, r)`` must be x W0ᵀ + (alpha/r) · x Aᵀ Bᵀ."""
    _require_callable(observed, "lora_forward")
    got = _value_of(observed["call"], "lora_forward")
    x, W0, A, B, alpha, r = q["x"], q["W0"], q["A"], q["B"], q["alpha"], q["r"]
    base, update = x @ W0.T, x @ A.T @ B.T
    want = base + (alpha / r) * update
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"lora_forward should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The output should have shape {tuple(want.shape)} (batch, tokens, d_out), yours has {tuple(got.shape)}.")
    if _close(got, base + alpha * update):
        _fail("You scaled BAx by alpha; LoRA scales it by alpha / r (so changing r does not change the update's size).")
    if _close(got, base + update):
        _fail("The low-rank update is missing its scaling factor alpha / r.")
    if _close(got, base):
        _fail("Your output equals the frozen layer alone: the update (alpha/r)·B A x is missing.")
    if _close(got, (alpha / r) * update):
        _fail("Your output is the low-rank update alone: the frozen layer's term x W0ᵀ is missing.")
    if _close(got, base + (r / alpha) * update):
        _fail("You scaled by r / alpha; LoRA's scaling is alpha / r.")
    _fail("lora_forward(x, W0, A, B, alpha, r) does not equal x W0ᵀ + (alpha/r) · x Aᵀ Bᵀ. "
          "Check the order: x first goes through A (r×d_in), then B (d_out×r).")


check_lora_forward = Exercise(
    "function", _forward_request, _forward_probe, _forward_judge,
    doc="``lora_forward(x, W0, A, B, alpha, r)`` must be x W0ᵀ + (alpha/r) · x Aᵀ Bᵀ.")


# --- LoRA chapter: merging ----------------------------------------------------------------------
def _merge_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r = 10, 6, 2
    return {"W0": torch.randn(d_out, d_in, generator=g), "A": torch.randn(r, d_in, generator=g),
            "B": torch.randn(d_out, r, generator=g), "alpha": 16.0, "r": r}


def _merge_probe(merge_weight, q: dict) -> dict:
    observed = _answer_kind(merge_weight)
    if observed["callable"]:
        W0 = q["W0"].clone()
        observed["call"] = _run(merge_weight, W0, q["A"].clone(), q["B"].clone(), q["alpha"], q["r"])
        observed["W0_after"] = W0
    return observed


def _merge_judge(q: dict, observed: dict) -> None:
    """``merge_weight(W0, A, B, alpha, r)`` must return W0 + (alpha/r)·B A, and not modify W0."""
    _require_callable(observed, "merge_weight")
    if not torch.equal(observed["W0_after"], q["W0"]):
        _fail("merge_weight changed W0 in place; return a new tensor (e.g. W0 + ...), so that unmerging stays possible.")
    got = _value_of(observed["call"], "merge_weight")
    W0, A, B, alpha, r = q["W0"], q["A"], q["B"], q["alpha"], q["r"]
    if _close(got, W0 + (alpha / r) * B @ A):
        return
    if not isinstance(got, torch.Tensor) or got.shape != W0.shape:
        _fail(f"merge_weight should return a tensor of W0's shape {tuple(W0.shape)}.")
    if _close(got, W0 + alpha * B @ A):
        _fail("You added alpha·BA; the merged update is (alpha / r)·BA, exactly what the forward pass adds.")
    if _close(got, W0 + B @ A):
        _fail("The merged update is missing its scaling alpha / r.")
    _fail("merge_weight does not return W0 + (alpha/r)·B A. Note B A (d_out×d_in) has W0's shape; A B would not.")


check_merge_weight = Exercise(
    "function", _merge_request, _merge_probe, _merge_judge,
    doc="``merge_weight(W0, A, B, alpha, r)`` must return W0 + (alpha/r)·B A, and not modify W0.")


# --- LoRA chapter: a LoRA module ----------------------------------------------------------------
def _module_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r = 16, 12, 4
    bound = d_in ** -0.5
    return {"weight": (torch.rand(d_out, d_in, generator=g) * 2 - 1) * bound,
            "bias": (torch.rand(d_out, generator=g) * 2 - 1) * bound,
            "x": torch.randn(3, d_in, generator=g), "B": torch.randn(d_out, r, generator=g), "r": r, "alpha": 8,
            "init_seed": seed}  # seeds the learner's own random init of A, so that a check is repeatable


def _module_probe(lora_linear_class, q: dict) -> dict:
    """Build the learner's layer around a fixed base layer and record it stage by stage."""
    observed = _answer_kind(lora_linear_class)
    if not observed["callable"]:
        return observed
    observed["name"] = getattr(lora_linear_class, "__name__", "your class")
    base = nn.Linear(q["weight"].shape[1], q["weight"].shape[0])
    with torch.no_grad():
        base.weight.copy_(q["weight"])
        base.bias.copy_(q["bias"])
    torch.manual_seed(q["init_seed"])
    observed["construct"], layer = _call(lora_linear_class, base, q["r"], q["alpha"])
    if observed["construct"]["status"] != "ok":
        return observed
    observed["is_module"] = isinstance(layer, nn.Module)
    if not observed["is_module"]:
        return observed
    factors = {}
    for name in ("A", "B"):
        factor = getattr(layer, name, None)
        factors[name] = {"type": None if factor is None else type(factor).__name__,
                         "is_parameter": isinstance(factor, nn.Parameter),
                         "shape": list(factor.shape) if isinstance(factor, torch.Tensor) else None}
    observed["factors"] = factors
    if not all(f["is_parameter"] for f in factors.values()) or factors["B"]["shape"] != list(q["B"].shape):
        return observed
    observed["trainable"] = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    observed["A_init"], observed["B_init"] = layer.A.detach().clone(), layer.B.detach().clone()
    observed["out_init"] = _run(layer, q["x"].clone())
    with torch.no_grad():
        layer.B.copy_(q["B"])
    observed["A"] = layer.A.detach().clone()
    outcome, out = _call(layer, q["x"].clone())
    observed["out"] = outcome | {"value": _capture(out)} if outcome["status"] == "ok" else outcome
    if isinstance(out, torch.Tensor) and out.requires_grad:
        try:
            out.sum().backward()
        except Exception as error:
            observed["backward_error"] = f"{type(error).__name__}: {error}"[:500]
    observed["A_grad"] = None if layer.A.grad is None else layer.A.grad.clone()
    observed["B_grad"] = None if layer.B.grad is None else layer.B.grad.clone()
    return observed


def _module_judge(q: dict, observed: dict) -> None:
    """The learner's class must behave like ``peft_edu.LoraLinear``.

    Checked: the base layer is frozen, A is r×d_in and B is d_out×r, only A and B train, the output
    at initialisation equals the base layer's (B = 0, A random), and with the same A and B the
    output and gradients equal the reference.
    """
    _require_callable(observed, "Your LoRA class", kind="class")
    r, alpha, x = q["r"], q["alpha"], q["x"]
    d_out, d_in = q["weight"].shape
    if observed["construct"]["status"] != "ok":
        _value_of(observed["construct"], f"{observed['name']}(base, r, alpha)")
    if not observed["is_module"]:
        _fail("Your class should be an nn.Module (class MyLoRALinear(nn.Module): ...).")
    for name, factor in observed["factors"].items():
        if factor["type"] is None:
            _fail(f"Your module has no `self.{name}` yet (is __init__ still the blank `...`?): in __init__, "
                  f"store the LoRA factor as `self.{name} = nn.Parameter(...)` so that it trains.")
        if not factor["is_parameter"]:
            _fail(f"`self.{name}` is a {factor['type']}, not an nn.Parameter: store the factor itself as "
                  f"`self.{name} = nn.Parameter(torch.empty(...))` (a tensor, not an nn.Linear), so that it trains.")
    shapes = observed["factors"]["A"]["shape"], observed["factors"]["B"]["shape"]
    if shapes != ([r, d_in], [d_out, r]):
        _fail(f"Expected A of shape (r, d_in) = {(r, d_in)} and B of shape (d_out, r) = {(d_out, r)}; "
              f"yours are {tuple(shapes[0])} and {tuple(shapes[1])}.")
    if observed["trainable"] != ["A", "B"]:
        _fail(f"Exactly A and B should require grad; trainable now: {observed['trainable']}. Freeze the base layer "
              "(base.requires_grad_(False)).")
    if torch.count_nonzero(observed["B_init"]) != 0:
        _fail("B starts random; LoRA starts from ΔW = B A = 0, so B must be zeros (A stays random).")
    if torch.count_nonzero(observed["A_init"]) == 0:
        _fail("A starts at zero too: then ∂L/∂B = 0 and ∂L/∂A = 0, so nothing would ever train. Initialise A randomly "
              "(nn.init.kaiming_uniform_(A, a=math.sqrt(5)), as PEFT).")
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(q["weight"])
        base.bias.copy_(q["bias"])
    base_out = base(x)
    if not _close(_value_of(observed["out_init"], "your forward"), base_out):
        _fail("At initialisation (B = 0) your layer must return exactly what the frozen base layer returns.")
    # The same factors in the reference, then compare outputs and gradients.
    A = observed["A"]
    reference = LoraLinear(base, r=r, lora_alpha=alpha)
    with torch.no_grad():
        reference.lora_A.weight.copy_(A)
        reference.lora_B.weight.copy_(q["B"])
    out, want = _value_of(observed["out"], "your forward"), reference(x)
    if not _close(out, want.detach()):
        if _close(out, base_out + alpha * (x @ A.T @ q["B"].T)):
            _fail("Your forward scales B A x by alpha; LoRA uses alpha / r.")
        if _close(out, base_out + (x @ A.T @ q["B"].T)):
            _fail("Your forward is missing the scaling alpha / r.")
        _fail("With B ≠ 0 your output differs from base(x) + (alpha/r)·x Aᵀ Bᵀ.")
    want.sum().backward()
    if observed.get("A_grad") is None or not _close(observed["A_grad"], reference.lora_A.weight.grad):
        _fail("The gradient reaching A differs from the reference: is A used in the forward exactly once, "
              "as x @ A.T, without .detach()?")
    if observed.get("B_grad") is None or not _close(observed["B_grad"], reference.lora_B.weight.grad):
        _fail("The gradient reaching B differs from the reference (or is missing): is B used in the forward "
              "exactly once, as (x @ A.T) @ B.T, without .detach()?")


check_lora_module = Exercise(
    "class", _module_request, _module_probe, _module_judge,
    doc="``lora_linear_class(base: nn.Linear, r, alpha)`` must behave like ``peft_edu.LoraLinear``.")


# --- LoRA chapter: one gradient step from an initialisation ------------------------------------
# The cases, judged in this order: with A and B both random every mistake below gives a different ΔW.
_STEP_INITS = ("A and B random", "A random, B = 0", "A = 0, B random", "A = 0, B = 0")


def _step_request(seed: int) -> dict:
    """Four layers, one per initialisation, each of its own shape (so that no two cases share shapes) and dtype."""
    g = torch.Generator().manual_seed(seed)
    d_in = int(torch.randint(5, 12, (1,), generator=g))
    d_out = d_in + int(torch.randint(1, 6, (1,), generator=g))  # never square: a transpose cannot pass by accident
    r, rows = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(3, 7, (1,), generator=g))
    cases = []
    for i, init in enumerate(_STEP_INITS):
        dtype = torch.float64 if (seed + i) % 2 else torch.float32
        n = rows + i

        def draw(*shape):
            return (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

        A, B = draw(r, d_in), draw(d_out + i, r)
        if init.startswith("A = 0"):
            A = torch.zeros_like(A)
        if init.endswith("B = 0"):
            B = torch.zeros_like(B)
        cases.append({"init": init, "x": draw(n, d_in), "grad_h": draw(n, d_out + i), "A": A, "B": B,
                      "alpha": float(2 * r), "r": r, "lr": 0.05})
    return {"cases": cases}


def _step_probe(delta_weight_after_step, request: dict) -> dict:
    observed = _answer_kind(delta_weight_after_step)
    if observed["callable"]:
        observed["calls"] = []
        for case in request["cases"]:
            inputs = {name: case[name].clone() for name in ("x", "grad_h", "A", "B")}
            call = _run(delta_weight_after_step, inputs["x"], inputs["grad_h"], inputs["A"], inputs["B"],
                        case["alpha"], case["r"], case["lr"])
            call["changed"] = [name for name, value in inputs.items() if not torch.equal(value, case[name])]
            observed["calls"].append(call)
    return observed


def _step_variants(case: dict) -> dict[str, torch.Tensor]:
    """The right ΔW after the step ("right") and what recognisable mistakes give instead, in float64."""
    x, g, A, B = (case[name].double() for name in ("x", "grad_h", "A", "B"))
    s, lr = case["alpha"] / case["r"], case["lr"]
    grad_A, grad_B = s * B.T @ g.T @ x, s * g.T @ (x @ A.T)  # summed over the rows of x
    new_A, new_B = A - lr * grad_A, B - lr * grad_B
    return {
        "right": s * new_B @ new_A,
        "only B moved": s * new_B @ A,
        "only A moved": s * B @ new_A,
        "A's gradient at the new B": s * new_B @ (A - lr * s * new_B.T @ g.T @ x),
        "B's gradient at the new A": s * (B - lr * s * g.T @ (x @ new_A.T)) @ new_A,
        "first order only": s * (B @ A - lr * grad_B @ A - lr * B @ grad_A),
        "gradients without the scaling": s * (B - lr * grad_B / s) @ (A - lr * grad_A / s),
        "no scaling of ΔW": new_B @ new_A,
        "gradient ascent": s * (B + lr * grad_B) @ (A + lr * grad_A),
        "ΔW before the step": s * B @ A,
        "full fine-tuning's step": s * B @ A - lr * g.T @ x,
        "mean over the rows": s * (B - lr * grad_B / len(x)) @ (A - lr * grad_A / len(x)),
    }


_STEP_FEEDBACK = {
    "only B moved": "You moved B but not A. A moves too, by -lr·∂L/∂A = -lr·s·Bᵀ(∂L/∂h)ᵀx: zero while B = 0, but not "
                    "once B ≠ 0 (this case has B random).",
    "only A moved": "You moved A but not B. B moves by -lr·∂L/∂B = -lr·s·(∂L/∂h)ᵀ(x Aᵀ), which is not zero when A ≠ 0.",
    "A's gradient at the new B": "You computed A's gradient with B already updated. One step takes both gradients at the "
                                 "old A and B, then moves both.",
    "B's gradient at the new A": "You computed B's gradient with A already updated. One step takes both gradients at the "
                                 "old A and B, then moves both.",
    "first order only": "You dropped the lr² term: (B - lr·g_B)(A - lr·g_A) has four terms, and ΔW after the step is "
                        "exactly s times that product.",
    "gradients without the scaling": "Your gradients miss the factor s = alpha / r: h = W₀x + s·B A x, so both "
                                     "∂L/∂A and ∂L/∂B carry s.",
    "no scaling of ΔW": "ΔW after the step is s·B'A' with s = alpha / r; you returned B'A' without s.",
    "gradient ascent": "You moved up the gradient (+lr·∂L/∂A); gradient descent subtracts it.",
    "ΔW before the step": "You returned ΔW = s·B A before the step: A and B first move by -lr times their gradients.",
    "full fine-tuning's step": "You stepped on W directly (ΔW - lr·(∂L/∂h)ᵀx, full fine-tuning's step). LoRA can only "
                               "move A and B, so ΔW changes to s·B'A'.",
    "mean over the rows": "You averaged over the rows of x; ∂L/∂A and ∂L/∂B are sums over the rows (each row is one "
                          "input vector of the same layer).",
}


def _near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    got, want = got.double(), want.double()
    return got.shape == want.shape and bool((got - want).norm() <= tolerance * (want.norm() + 1.0))


def _step_judge(request: dict, observed: dict) -> None:
    """``delta_weight_after_step(x, grad_h, A, B, alpha, r, lr)``: s·(B - lr·∂L/∂B)(A - lr·∂L/∂A), s = alpha/r."""
    _require_callable(observed, "delta_weight_after_step")
    for case, call in zip(request["cases"], observed["calls"]):
        got = _value_of(call, "delta_weight_after_step")
        where = f"(in the case {case['init']}: x of shape {tuple(case['x'].shape)}, r={case['r']}, {case['x'].dtype})"
        if call["changed"]:
            _fail(f"delta_weight_after_step changed {', '.join(call['changed'])} in place {where}; compute new tensors "
                  "(A - lr * grad_A) and leave the caller's inputs as they were.")
        if not isinstance(got, torch.Tensor):
            _fail(f"delta_weight_after_step should return a tensor, it returned "
                  f"{got.get('type') if isinstance(got, dict) else type(got).__name__}.")
        d_out, d_in = case["grad_h"].shape[1], case["x"].shape[1]
        if tuple(got.shape) != (d_out, d_in):
            _fail(f"ΔW should have the layer's weight shape (d_out, d_in) = {(d_out, d_in)}; yours is {tuple(got.shape)} "
                  f"{where}.")
        if got.dtype != case["x"].dtype:
            _fail(f"With {case['x'].dtype} inputs you return {got.dtype} {where}: compute in the inputs' dtype.")
        variants = _step_variants(case)
        if _near(got, variants["right"], got.dtype):
            continue
        for mistake, message in _STEP_FEEDBACK.items():
            if _near(got, variants[mistake], got.dtype):
                _fail(f"{message} {where}")
        _fail(f"delta_weight_after_step does not return s·(B - lr·∂L/∂B)(A - lr·∂L/∂A) {where}. The gradients, "
              "summed over the rows of x, are ∂L/∂A = s·Bᵀ(∂L/∂h)ᵀx (r × d_in) and ∂L/∂B = s·(∂L/∂h)ᵀ(x Aᵀ) (d_out × r).")


check_delta_after_step = Exercise(
    "function", _step_request, _step_probe, _step_judge,
    doc="``delta_weight_after_step(x, grad_h, A, B, alpha, r, lr)`` must return ΔW = s·B'A' after one gradient-descent "
        "step on A and B (s = alpha / r), both gradients taken at the old A and B, the inputs left unchanged.")
