"""Checks behind the graded exercises: compare a learner's answer with the reference on fresh inputs.

Each exercise is checked in three steps, kept apart so that grading can run the learner's code in a
sandbox and judge it outside (see ``peft_edu.grading``):

1. ``request(seed)``: the inputs, drawn from ``seed`` (tensors and numbers only);
2. ``probe(answer, request)``: runs the learner's code on them and records what happened (values,
   shapes, exceptions), never judging;
3. ``judge(request, observations)``: compares the observations with the reference and raises
   ``CheckFailed`` with feedback the learner can act on. Where a common mistake has a recognisable
   signature (α instead of α/r, B initialised randomly, ...), the message names it.

``check_lora_forward(lora_forward, seed=0)`` and its siblings do all three in one process: that is
what the notebooks' otter tests call. ``tests/test_checks.py`` proves that every check rejects the
blank stub and plausible wrong answers. A hidden test uses another ``seed``, so an answer cannot be
fitted to the public test's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .lora import LoraLinear


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how."""


def _fail(message: str):
    raise CheckFailed(message)


# --- probing: run the learner's code and record, never judge ------------------------------------
def _capture(value):
    """A learner's return value as data: tensors, numbers, strings, None; anything else by its type."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if value is Ellipsis:
        return None
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:  # numpy scalars
        return value.item()
    return {"type": type(value).__name__}


def _call(fn, *args) -> tuple[dict, object]:
    """Call the learner's code: ({"status": "ok"}, its value), or how it failed and None."""
    try:
        return {"status": "ok"}, fn(*args)
    except NotImplementedError:
        return {"status": "not_implemented"}, None
    except Exception as error:
        return {"status": "raised", "error": f"{type(error).__name__}: {error}"[:500]}, None


def _run(fn, *args) -> dict:
    """Call the learner's code and record the outcome with the value as data."""
    outcome, value = _call(fn, *args)
    return outcome | {"value": _capture(value)} if outcome["status"] == "ok" else outcome


def _answer_kind(answer) -> dict:
    return {"callable": callable(answer), "repr": repr(answer)[:100]}


# --- judging helpers ----------------------------------------------------------------------------
def _require_callable(observed: dict, name: str, kind: str = "function") -> None:
    if not observed["callable"]:
        _fail(f"{name} is {observed['repr']}, not a {kind}: define it (run the cell with your code) before running the check.")


def _value_of(call: dict, what: str):
    """The value a probed call returned, or the failure explained in the learner's terms."""
    if call["status"] == "not_implemented":
        _fail(f"{what} is not implemented yet: replace the `raise NotImplementedError` (or `...`) with your code.")
    if call["status"] == "raised":
        _fail(f"{what} raised {call['error']}")
    if call["value"] is None:  # the blank stub (`...`) or a forgotten `return`
        _fail(f"{what} returned None: it is not implemented yet (replace the `...` with your code), "
              "or a `return` is missing.")
    return call["value"]


def _close(a, b, atol=1e-5, rtol=1e-4) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b, atol=atol, rtol=rtol)


@dataclass(frozen=True)
class Exercise:
    """One checkable exercise: how to draw inputs, run the answer on them, and judge the result."""

    answer_kind: str                          # "function" or "class"
    request: Callable[[int], dict]
    probe: Callable[[object, dict], dict]
    judge: Callable[[dict, dict], None]

    def check(self, answer, seed: int = 0) -> None:
        request = self.request(seed)
        self.judge(request, self.probe(answer, request))


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


LORA_PARAM_COUNT = Exercise("function", _param_count_request, _param_count_probe, _param_count_judge)


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


LORA_FORWARD = Exercise("function", _forward_request, _forward_probe, _forward_judge)


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


MERGE_WEIGHT = Exercise("function", _merge_request, _merge_probe, _merge_judge)


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


LORA_MODULE = Exercise("class", _module_request, _module_probe, _module_judge)

# --- Adapters chapter: parameters of a bottleneck adapter ---------------------------------------
def _bn_params_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    random_cases = [[int(torch.randint(64, 4096, (1,), generator=g)), int(torch.randint(3, 65, (1,), generator=g))]
                    for _ in range(3)]
    # 384 // 16 = 24 (MiniLM, Pfeiffer), 768 // 5 = 153 (not a divisor), 384 // 2 = 192 (parallel)
    return {"cases": [[384, 16], [768, 5], [384, 2]] + random_cases}


def _bn_params_probe(bottleneck_params, request: dict) -> dict:
    observed = _answer_kind(bottleneck_params)
    if observed["callable"]:
        observed["calls"] = [_run(bottleneck_params, d, factor) for d, factor in request["cases"]]
    return observed


def _bn_params_judge(request: dict, observed: dict) -> None:
    """``bottleneck_params(d, reduction_factor)`` must be 2·d·m + m + d with m = d // reduction_factor."""
    _require_callable(observed, "bottleneck_params")
    for (d, factor), call in zip(request["cases"], observed["calls"]):
        got = _value_of(call, "bottleneck_params")
        m = max(1, d // factor)
        want = 2 * d * m + m + d
        if got == want:
            continue
        if got == 2 * d * m:
            _fail(f"For d={d}, reduction_factor={factor} you return 2·d·m = {got}: the two weight matrices only. "
                  "Both projections are nn.Linear layers with a bias: add m (down) + d (up).")
        if got in (2 * d * m + m, 2 * d * m + d):
            _fail(f"For d={d}, reduction_factor={factor} you return {got}: one of the two biases is missing "
                  "(W_down has a bias of m entries, W_up one of d entries).")
        if got in (d * m + m, d * m + d, d * m):
            _fail(f"For d={d}, reduction_factor={factor} you return {got}: that counts one projection only. "
                  "An adapter has a down-projection (d→m) and an up-projection (m→d).")
        exact = d / factor
        if isinstance(got, (int, float)) and m != exact and abs(got - (2 * d * exact + exact + d)) < 1e-6:
            _fail(f"For d={d}, reduction_factor={factor} the bottleneck size must be a whole number of units: "
                  f"m = d // reduction_factor = {m}, not d / reduction_factor = {exact:g}.")
        _fail(f"For d={d}, reduction_factor={factor} the answer is not {got!r}. With m = d // reduction_factor, "
              "count the weights and biases of the down-projection (d→m) and of the up-projection (m→d).")


BOTTLENECK_PARAMS = Exercise("function", _bn_params_request, _bn_params_probe, _bn_params_judge)


# --- Adapters chapter: the adapter's forward pass -----------------------------------------------
def _adapter_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d, m = 10, 4  # d ≠ m: swapped projections cannot pass by accident
    return {"h": torch.randn(2, 3, d, generator=g), "W_down": torch.randn(m, d, generator=g),
            "b_down": torch.randn(m, generator=g), "W_up": torch.randn(d, m, generator=g),
            "b_up": torch.randn(d, generator=g)}


def _adapter_probe(adapter_forward, q: dict) -> dict:
    observed = _answer_kind(adapter_forward)
    if observed["callable"]:
        observed["call"] = _run(adapter_forward, *(q[k].clone() for k in ("h", "W_down", "b_down", "W_up", "b_up")))
    return observed


def _adapter_judge(q: dict, observed: dict) -> None:
    """``adapter_forward(h, W_down, b_down, W_up, b_up)`` must be h + W_up·ReLU(W_down·h + b_down) + b_up."""
    _require_callable(observed, "adapter_forward")
    got = _value_of(observed["call"], "adapter_forward")
    h, W_down, b_down, W_up, b_up = q["h"], q["W_down"], q["b_down"], q["W_up"], q["b_up"]
    down = h @ W_down.T + b_down
    branch = torch.relu(down) @ W_up.T + b_up
    want = h + branch
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"adapter_forward should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The output should have h's shape {tuple(want.shape)}, yours has {tuple(got.shape)}: the adapter "
              "projects down to m units and back up to d.")
    if _close(got, branch):
        _fail("Your output is the adapter branch alone: the residual (skip) connection h + ... is missing, so the "
              "adapter would replace the hidden state instead of adding a small correction to it.")
    if _close(got, h + torch.relu(down @ W_up.T + b_up)):
        _fail("The ReLU is in the wrong place: you apply it after the up-projection. The non-linearity sits in the "
              "bottleneck, between W_down and W_up: h + W_up·f(W_down·h + b_down) + b_up.")
    if _close(got, torch.relu(h + branch)):
        _fail("You apply the ReLU to the sum h + branch; it belongs inside the bottleneck, between W_down and W_up "
              "(a ReLU after the residual would zero every negative feature of h).")
    if _close(got, h + down @ W_up.T + b_up):
        _fail("The non-linearity is missing: without it the adapter is a linear (low-rank) map. "
              "Apply ReLU to W_down·h + b_down.")
    if _close(got, h + torch.relu(h @ W_down.T) @ W_up.T) or _close(got, h + torch.relu(down) @ W_up.T):
        _fail("A bias is missing: the down-projection adds b_down (before the ReLU), the up-projection adds b_up.")
    _fail("adapter_forward(h, W_down, b_down, W_up, b_up) does not equal h + W_up·ReLU(W_down·h + b_down) + b_up. "
          "With h of shape (..., d): first h @ W_down.T (to m units), then ReLU, then @ W_up.T (back to d).")


ADAPTER_FORWARD = Exercise("function", _adapter_request, _adapter_probe, _adapter_judge)


# --- Adapters chapter: IA³ in the feed-forward network ------------------------------------------
def _ia3_ffn_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for d_in, d_out in ((8, 8), (16, 6)):  # square first (scaling the output would run), then the FFN's 4d → d
        cases.append({"x": torch.randn(2, 3, d_in, generator=g), "W": torch.randn(d_out, d_in, generator=g),
                      "b": torch.randn(d_out, generator=g), "l": torch.rand(d_in, generator=g) * 2})
    return {"cases": cases}


def _ia3_ffn_probe(ia3_scale_ffn, q: dict) -> dict:
    observed = _answer_kind(ia3_scale_ffn)
    if observed["callable"]:
        observed["calls"] = [_run(ia3_scale_ffn, *(c[k].clone() for k in ("x", "W", "b", "l"))) for c in q["cases"]]
    return observed


def _ia3_ffn_judge(q: dict, observed: dict) -> None:
    """``ia3_scale_ffn(x, W, b, l)`` must be W (l ⊙ x) + b: IA³ scales the input of the FFN's second projection."""
    _require_callable(observed, "ia3_scale_ffn")
    for case, call in zip(q["cases"], observed["calls"]):
        x, W, b, l = case["x"], case["W"], case["b"], case["l"]
        if call["status"] == "raised" and "size of tensor" in call["error"] and W.shape[0] != W.shape[1]:
            _fail(f"ia3_scale_ffn raised {call['error']} for a layer with d_in={W.shape[1]}, d_out={W.shape[0]}. "
                  "l has d_in entries: it scales the layer's *input* (the FFN's inner activation), not its output.")
        got = _value_of(call, "ia3_scale_ffn")
        want = (x * l) @ W.T + b
        if _close(got, want):
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            _fail(f"ia3_scale_ffn should return a tensor of shape {tuple(want.shape)} (..., d_out).")
        if _close(got, l * (x @ W.T + b)) or _close(got, l * (x @ W.T) + b):
            _fail("You scaled the layer's output. For the feed-forward layer IA³ scales the *input*, the FFN's inner "
                  "activation (l_ff ⊙ γ(W₁x) in the paper), before the projection: W (l ⊙ x) + b.")
        if _close(got, (x * l) @ W.T):
            _fail("The bias b is missing: the layer still adds it, unscaled: W (l ⊙ x) + b.")
        if _close(got, (x * l) @ W.T + b * l):
            _fail("You scaled the bias too. Only the input is scaled: W (l ⊙ x) + b.")
        if _close(got, x @ W.T + b):
            _fail("Your output is the frozen layer's: the learned vector l is not used.")
        _fail("ia3_scale_ffn(x, W, b, l) does not equal W (l ⊙ x) + b, i.e. (x * l) @ W.T + b.")


IA3_SCALE_FFN = Exercise("function", _ia3_ffn_request, _ia3_ffn_probe, _ia3_ffn_judge)


# --- DoRA chapter: the norm per output feature --------------------------------------------------
def _row_norm_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = 5 + seed % 3, 9  # not square: the wrong axis gives the wrong shape
    return {"W": torch.randn(d_out, d_in, generator=g) * (1 + torch.rand(d_out, 1, generator=g))}


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
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"weight_norm should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if not torch.equal(observed["W_after"], W):
        _fail("weight_norm changed W in place; compute the norms without modifying the weight.")
    if _close(got, torch.linalg.vector_norm(W, dim=0)):
        _fail(f"You took the norm over the wrong axis: one number per input feature (shape {tuple(W.shape[1:])}). "
              f"nn.Linear stores W as (d_out, d_in); DoRA needs one norm per output feature, over d_in (dim=1), "
              f"shape ({W.shape[0]},).")
    if got.numel() == 1 and _close(got.reshape(()), torch.linalg.vector_norm(W)):
        _fail("You returned the norm of the whole matrix (one number); DoRA needs one norm per output feature (per row).")
    if got.shape == (W.shape[0], 1) and _close(got.squeeze(1), want):
        _fail(f"Right values, but shape (d_out, 1) = {tuple(got.shape)}: return shape ({W.shape[0]},), "
              "without keepdim (the magnitude vector m has that shape).")
    if _close(got, want.square()):
        _fail("You returned the squared norms: take the square root (torch.linalg.vector_norm does).")
    if got.shape != want.shape:
        _fail(f"weight_norm should return shape (d_out,) = ({W.shape[0]},), one norm per output feature; yours has {tuple(got.shape)}.")
    _fail("weight_norm(W) does not equal the L2 norm of each row of W, ‖W[i, :]‖₂.")


WEIGHT_NORM = Exercise("function", _row_norm_request, _row_norm_probe, _row_norm_judge)


# --- DoRA chapter: the merged DoRA weight -------------------------------------------------------
def _dora_weight_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r = 11, 6, 2
    W0 = torch.randn(d_out, d_in, generator=g)
    return {"W0": W0, "A": torch.randn(r, d_in, generator=g) * 0.5, "B": torch.randn(d_out, r, generator=g) * 0.5,
            "m": torch.linalg.vector_norm(W0, dim=1) * (0.5 + torch.rand(d_out, generator=g)), "alpha": 6.0, "r": r}


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
    if _close(got, m[:, None] * direction(alpha / r)):
        return
    if not isinstance(got, torch.Tensor) or got.shape != W0.shape:
        _fail(f"dora_weight should return a tensor of W0's shape {tuple(W0.shape)} (d_out, d_in).")
    if _close(got, m[:, None] * direction(alpha / r, dim=0)):
        _fail("You normalised over the wrong axis (each column, one norm per input feature). DoRA normalises each "
              "output feature: the norm over d_in, dim=1 of the (d_out, d_in) matrix.")
    if _close(got, m[:, None] * direction(1.0)):
        _fail("The low-rank update is missing its scaling alpha / r: V = W0 + (alpha/r)·B A.")
    if _close(got, m[:, None] * direction(alpha)):
        _fail("You scaled BA by alpha; LoRA's (and DoRA's) scaling is alpha / r.")
    if _close(got, m[:, None] * V / torch.linalg.vector_norm(W0, dim=1, keepdim=True)):
        _fail("You divided by the norm of W0; DoRA divides by the norm of the adapted V = W0 + (alpha/r)·B A, "
              "so that each row of the direction has length 1.")
    if _close(got, direction(alpha / r)):
        _fail("You returned the direction V/‖V‖ only: multiply each row by its magnitude m.")
    if _close(got, m[:, None] * V):
        _fail("You did not normalise V: divide each row by its norm before multiplying by m.")
    if _close(got, V):
        _fail("You returned the LoRA weight W0 + (alpha/r)·B A: DoRA rescales each row to length m.")
    _fail("dora_weight does not equal m ⊙ V / ‖V‖ (per row), V = W0 + (alpha/r)·B A. "
          "m has one entry per output feature: broadcast it over the rows (m[:, None]).")


DORA_WEIGHT = Exercise("function", _dora_weight_request, _dora_weight_probe, _dora_weight_judge)


# --- DoRA chapter: the forward pass, with the norm detached --------------------------------------
def _dora_forward_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r = 10, 7, 3
    W0 = torch.randn(d_out, d_in, generator=g)
    return {"x": torch.randn(2, 4, d_in, generator=g), "W0": W0, "A": torch.randn(r, d_in, generator=g) * 0.5,
            "B": torch.randn(d_out, r, generator=g) * 0.5,
            "m": torch.linalg.vector_norm(W0, dim=1) * (0.5 + torch.rand(d_out, generator=g)),
            "alpha": 4.0, "r": r, "grad_out": torch.randn(2, 4, d_out, generator=g)}


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
    """``dora_forward(x, W0, A, B, m, alpha, r)``: x W'ᵀ with W' the DoRA weight, the norm a constant in backward."""
    _require_callable(observed, "dora_forward")
    got = _value_of(observed["call"], "dora_forward")
    want, grads = _dora_forward_reference(q)
    if not _close(got, want):
        if not isinstance(got, torch.Tensor):
            _fail(f"dora_forward should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
        if got.shape != want.shape:
            _fail(f"The output should have shape {tuple(want.shape)} (batch, tokens, d_out), yours has {tuple(got.shape)}.")
        x, W0, A, B, m, s = q["x"], q["W0"], q["A"], q["B"], q["m"], q["alpha"] / q["r"]
        V = W0 + s * (B @ A)
        if _close(got, x @ (m[:, None] * V / torch.linalg.vector_norm(V, dim=0, keepdim=True)).T) or \
                _close(got, x @ (V / torch.linalg.vector_norm(V, dim=0, keepdim=True)).T * m):
            _fail("You normalised over the wrong axis (one norm per input feature); DoRA takes one norm per output "
                  "feature, over d_in (dim=1 of W0's (d_out, d_in)).")
        V1 = W0 + B @ A
        if _close(got, x @ (m[:, None] * V1 / torch.linalg.vector_norm(V1, dim=1, keepdim=True)).T):
            _fail("The low-rank update is missing its scaling alpha / r: V = W0 + (alpha/r)·B A.")
        if _close(got, x @ V.T):
            _fail("Your output is plain LoRA, x (W0 + (alpha/r)·BA)ᵀ: DoRA rescales each output feature by m / ‖V‖.")
        if _close(got, x @ (V / torch.linalg.vector_norm(V, dim=1, keepdim=True)).T):
            _fail("The magnitude m is missing: multiply each output feature by m.")
        _fail("dora_forward does not equal x W'ᵀ with W' = m ⊙ V / ‖V‖ (one norm per output feature), "
              "V = W0 + (alpha/r)·B A.")
    if "backward_error" in observed:
        _fail(f"Backward through your output raised {observed['backward_error']}")
    mine = observed["grads"]
    missing = [k for k in ("A", "B", "m") if mine[k] is None]
    if missing:
        _fail(f"No gradient reaches {', '.join(missing)}: use the tensors that are passed in (no .detach() on them, "
              "no torch.no_grad() around the forward).")
    if _close(mine["A"], grads["A"]) and _close(mine["B"], grads["B"]) and _close(mine["m"], grads["m"]):
        return
    _, through_norm = _dora_forward_reference(q, detach=False)
    if all(_close(mine[k], through_norm[k]) for k in ("A", "B", "m")):
        _fail("Right output, but the gradient flows through ‖V‖: DoRA treats the norm as a constant in backward "
              "(paper §4.3). Detach it: norm = torch.linalg.vector_norm(V, dim=1).detach().")
    if not _close(mine["m"], grads["m"]):
        _fail("The gradient reaching m differs from the reference: is m used exactly once, as a factor of each output feature?")
    _fail("The gradients reaching A and B differ from the reference (norm detached, nothing else detached).")


DORA_FORWARD = Exercise("function", _dora_forward_request, _dora_forward_probe, _dora_forward_judge)


# --- Prompt-methods chapter: parameters of a prefix ----------------------------------------------
def _prefix_params_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    random_cases = [[draw(1, 64), draw(2, 40), draw(16, 1024), None] for _ in range(2)]
    random_cases += [[draw(1, 64), draw(2, 40), draw(16, 1024), draw(8, 512)]]
    # MiniLM (P-tuning v2), SmolLM2 (d_kv = 3 kv heads x 64 = 192), SmolLM2 with the re-parameterisation
    return {"cases": [[10, 6, 384, None], [20, 30, 192, None], [10, 30, 192, 64]] + random_cases}


def _prefix_params_probe(prefix_param_count, request: dict) -> dict:
    observed = _answer_kind(prefix_param_count)
    if observed["callable"]:
        observed["calls"] = [_run(prefix_param_count, *case) for case in request["cases"]]
    return observed


def _prefix_params_judge(request: dict, observed: dict) -> None:
    """``prefix_param_count(n, num_layers, hidden, projection_hidden=None)``: PEFT's trainable count of the prefix.

    Without the projection n·2·L·d; with it the embedding n·d, Linear(d, h) and Linear(h, 2·L·d), biases included.
    """
    _require_callable(observed, "prefix_param_count")
    for (n, L, d, h), call in zip(request["cases"], observed["calls"]):
        got = _value_of(call, "prefix_param_count")
        out = 2 * L * d
        if h is None:
            want = n * out
        else:
            want = n * d + (d * h + h) + (h * out + out)
        if got == want:
            continue
        args = f"num_virtual_tokens={n}, num_layers={L}, hidden={d}, projection_hidden={h}"
        if h is None:
            if got == n * L * d:
                _fail(f"For {args} you return n·L·d = {got}: the factor 2 is missing. Every layer gets a key *and* a "
                      "value per virtual token, P_K and P_V.")
            if got == 2 * n * d:
                _fail(f"For {args} you return 2·n·d = {got}: that is one layer's prefix. Prefix tuning gives every "
                      "one of the num_layers attention layers its own keys and values.")
            if got == n * d:
                _fail(f"For {args} you return n·d = {got}: that is prompt tuning's soft prompt (input only). "
                      "A prefix has keys and values (×2) in every layer (×num_layers).")
        else:
            if got == n * out:
                _fail(f"For {args} you return the size of the table P = n·2·L·d = {got}. With the re-parameterisation "
                      "P is not trained directly: count what is, the embedding (n×d) and the MLP's two Linear layers.")
            if got == n * d + d * h + h * out:
                _fail(f"For {args} you return {got}: the biases of the MLP's two Linear layers (h and 2·L·d numbers) "
                      "are missing.")
            if got == n * d + (d * h + h) + (h * out + out) + n * out:
                _fail(f"For {args} you return {got}: you added the table P = n·2·L·d too. During training P is the "
                      "MLP's output, not a parameter.")
            if got == n * d + (d * h + h) + (h * L * d + L * d):
                _fail(f"For {args} you return {got}: the MLP's output has 2·L·d numbers per token (a key and a value "
                      "for each layer); the factor 2 is missing.")
        _fail(f"For {args} the answer is not {got!r}. Count the trainable tensors PEFT builds: without the projection "
              "one table of n rows of 2·L·d numbers; with it Embedding(n, d), Linear(d, h), Tanh, Linear(h, 2·L·d).")


PREFIX_PARAM_COUNT = Exercise("function", _prefix_params_request, _prefix_params_probe, _prefix_params_judge)


# --- Prompt-methods chapter: the attention mask with virtual tokens ------------------------------
def _mask_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, T = 3 + seed % 2, 6 + seed % 3
    lengths = torch.randint(1, T, (batch,), generator=g)
    lengths[0] = T  # one full row, the others left-padded, as for generate()
    mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()
    return {"mask": mask, "n": int(torch.randint(2, 6, (1,), generator=g))}


def _mask_probe(extend_attention_mask, q: dict) -> dict:
    observed = _answer_kind(extend_attention_mask)
    if observed["callable"]:
        mask = q["mask"].clone()
        observed["call"] = _run(extend_attention_mask, mask, q["n"])
        observed["mask_after"] = mask
    return observed


def _mask_judge(q: dict, observed: dict) -> None:
    """``extend_attention_mask(mask, n)`` must prepend n columns of ones: [1ⁿ; mask], same dtype."""
    _require_callable(observed, "extend_attention_mask")
    if not torch.equal(observed["mask_after"], q["mask"]):
        _fail("extend_attention_mask changed the mask in place; return a new tensor.")
    got = _value_of(observed["call"], "extend_attention_mask")
    mask, n = q["mask"], q["n"]
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype)
    want = torch.cat([ones, mask], dim=1)
    if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got.to(mask.dtype), want):
        if got.dtype != mask.dtype:
            _fail(f"Right values, but dtype {got.dtype}: keep the mask's dtype ({mask.dtype}), e.g. mask.new_ones(...).")
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"extend_attention_mask should return a tensor, it returned "
              f"{got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The new mask should have shape {tuple(want.shape)} (batch, n + T): one column per virtual token in "
              f"front of the {mask.shape[1]} real ones; yours has {tuple(got.shape)}.")
    got = got.to(mask.dtype)
    if torch.equal(got, torch.cat([mask, ones], dim=1)):
        _fail("You appended the ones after the real tokens. The virtual tokens come first ([P; X]), so their columns "
              "go in front: torch.cat([ones, mask], dim=1).")
    if torch.equal(got, torch.cat([torch.zeros_like(ones), mask], dim=1)):
        _fail("You prepended zeros: a 0 in the mask means 'padding, do not attend', so the model would ignore the "
              "virtual tokens. They must always be visible: prepend ones.")
    if torch.equal(got, torch.cat([mask, torch.zeros_like(ones)], dim=1)):
        _fail("You appended zeros. The virtual tokens come first and are always attended to: prepend n columns of ones.")
    if torch.equal(got, torch.cat([mask[:, :1].expand(-1, n), mask], dim=1)):
        _fail("You repeated the mask's first column: for a left-padded row that is 0, and the row would not see the "
              "virtual tokens. Prepend ones, whatever the padding.")
    _fail("extend_attention_mask(mask, n) does not return [1ⁿ; mask]: n columns of ones, then the mask unchanged.")


EXTEND_ATTENTION_MASK = Exercise("function", _mask_request, _mask_probe, _mask_judge)


# --- Prompt-methods chapter: one attention head over [P_K; K] ----------------------------------
def _prefix_attention_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    T_q, T, n, d, d_v = 4, 5 + seed % 3, 3, 8, 6  # d ≠ d_v, n ≠ T: a swapped argument cannot pass by accident
    return {"q": torch.randn(T_q, d, generator=g), "K": torch.randn(T, d, generator=g),
            "V": torch.randn(T, d_v, generator=g), "P_K": torch.randn(n, d, generator=g) * 1.5,
            "P_V": torch.randn(n, d_v, generator=g) + 1.0}


def _prefix_attention_probe(prefix_attention, q: dict) -> dict:
    observed = _answer_kind(prefix_attention)
    if observed["callable"]:
        observed["call"] = _run(prefix_attention, *(q[k].clone() for k in ("q", "K", "V", "P_K", "P_V")))
    return observed


def _attend(q, K, V, scale=True):
    scores = q @ K.T
    if scale:
        scores = scores / K.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ V


def _prefix_attention_judge(q: dict, observed: dict) -> None:
    """``prefix_attention(q, K, V, P_K, P_V)`` must be softmax(q [P_K; K]ᵀ / √d) [P_V; V]."""
    _require_callable(observed, "prefix_attention")
    got = _value_of(observed["call"], "prefix_attention")
    x, K, V, P_K, P_V = q["q"], q["K"], q["V"], q["P_K"], q["P_V"]
    all_K, all_V = torch.cat([P_K, K]), torch.cat([P_V, V])
    want = _attend(x, all_K, all_V)
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"prefix_attention should return a tensor, it returned "
              f"{got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The output should have shape {tuple(want.shape)} (one row per query, the values' width); yours has "
              f"{tuple(got.shape)}. Only the real tokens have queries: the prefix adds keys and values, not rows.")
    if _close(got, _attend(x, K, V)):
        _fail("Your output ignores the prefix: it is attention over the real keys only. Concatenate [P_K; K] and "
              "[P_V; V] and take one softmax over all n + T keys.")
    if _close(got, _attend(x, P_K, P_V) + _attend(x, K, V)):
        _fail("You added two separately normalised attentions. There is one softmax over [P_K; K]: the prefix and "
              "the real tokens compete for the same attention weight (the gate λ of the unified view).")
    if _close(got, _attend(x, all_K, all_V, scale=False)):
        _fail("The scores are not scaled: divide q Kᵀ by √d (d = the keys' width) before the softmax.")
    if _close(got, _attend(x, torch.cat([P_K, K]), torch.cat([V, P_V]))) or _close(got, _attend(x, torch.cat([K, P_K]), all_V)):
        _fail("Keys and values are not in the same order: the i-th key must belong to the i-th value "
              "([P_K; K] with [P_V; V]).")
    if _close(got, torch.softmax(x @ all_K.T / K.shape[-1] ** 0.5, dim=0) @ all_V):
        _fail("The softmax runs over the wrong axis: each query's weights over the n + T keys must sum to 1 (dim=-1).")
    _fail("prefix_attention(q, K, V, P_K, P_V) does not equal softmax(q [P_K; K]ᵀ / √d) [P_V; V].")


PREFIX_ATTENTION = Exercise("function", _prefix_attention_request, _prefix_attention_probe, _prefix_attention_judge)


# --- Prompt-methods chapter: the gate of the unified view ----------------------------------------
def _gate_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    T_q, T, n, d = 5, 6 + seed % 4, 2 + seed % 3, 8
    return {"q": torch.randn(T_q, d, generator=g), "K": torch.randn(T, d, generator=g),
            "P_K": torch.randn(n, d, generator=g) * 1.5}


def _gate_probe(gate_lambda, q: dict) -> dict:
    observed = _answer_kind(gate_lambda)
    if observed["callable"]:
        observed["call"] = _run(gate_lambda, q["q"].clone(), q["K"].clone(), q["P_K"].clone())
    return observed


def _gate_judge(q: dict, observed: dict) -> None:
    """``gate_lambda(q, K, P_K)``: per query, the share of attention on the prefix, λ = Σ e^{s_P} / (Σ e^{s_P} + Σ e^{s_K})."""
    _require_callable(observed, "gate_lambda")
    got = _value_of(observed["call"], "gate_lambda")
    x, K, P_K = q["q"], q["K"], q["P_K"]
    scale = K.shape[-1] ** 0.5

    def gate(s_prefix, s_real):
        a, b = s_prefix.exp().sum(-1), s_real.exp().sum(-1)
        return a / (a + b)

    want = gate(x @ P_K.T / scale, x @ K.T / scale)
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"gate_lambda should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        if got.numel() == want.numel() and _close(got.reshape(want.shape), want):
            _fail(f"Right values, but shape {tuple(got.shape)}: return one λ per query, shape {tuple(want.shape)}.")
        _fail(f"gate_lambda should return one number per query, shape {tuple(want.shape)}; yours has {tuple(got.shape)}.")
    if _close(got, 1 - want):
        _fail("You returned 1 − λ, the share of attention on the real tokens. λ is the prefix's share: "
              "Σ exp(q P_Kᵀ/√d) over the total.")
    if _close(got, gate(x @ P_K.T, x @ K.T)):
        _fail("The scores are not scaled: use q P_Kᵀ / √d and q Kᵀ / √d, as the attention itself does.")
    if _close(got, torch.softmax(x @ P_K.T / scale, -1).sum(-1) / 2) or _close(got, torch.full_like(want, P_K.shape[0] / (P_K.shape[0] + K.shape[0]))):
        _fail("λ depends on the scores: it is Σ exp(q P_Kᵀ/√d) / (Σ exp(q P_Kᵀ/√d) + Σ exp(q Kᵀ/√d)), the prefix's "
              "share of one softmax over all n + T keys, not a count of keys.")
    if _close(got, gate(x @ P_K.T / scale, x @ K.T / scale) * K.shape[0] / P_K.shape[0]) or \
            _close(got, (x @ P_K.T / scale).exp().mean(-1) / ((x @ P_K.T / scale).exp().mean(-1) + (x @ K.T / scale).exp().mean(-1))):
        _fail("You averaged the exponentials instead of summing them: with n prefix keys and T real keys the sums "
              "Σ exp(...) are what the softmax's denominator adds up.")
    _fail("gate_lambda(q, K, P_K) does not equal Σ exp(q P_Kᵀ/√d) / (Σ exp(q P_Kᵀ/√d) + Σ exp(q Kᵀ/√d)), per query "
          "(sums over the keys, dim=-1).")


GATE_LAMBDA = Exercise("function", _gate_request, _gate_probe, _gate_judge)


# The names the notebooks' tests call; grading finds each exercise by the same name.
EXERCISES: dict[str, Exercise] = {
    "check_lora_param_count": LORA_PARAM_COUNT,
    "check_lora_forward": LORA_FORWARD,
    "check_merge_weight": MERGE_WEIGHT,
    "check_lora_module": LORA_MODULE,
    "check_bottleneck_params": BOTTLENECK_PARAMS,
    "check_adapter_forward": ADAPTER_FORWARD,
    "check_ia3_scale_ffn": IA3_SCALE_FFN,
    "check_weight_norm": WEIGHT_NORM,
    "check_dora_weight": DORA_WEIGHT,
    "check_dora_forward": DORA_FORWARD,
    "check_prefix_param_count": PREFIX_PARAM_COUNT,
    "check_extend_attention_mask": EXTEND_ATTENTION_MASK,
    "check_prefix_attention": PREFIX_ATTENTION,
    "check_gate_lambda": GATE_LAMBDA,
}


def check_lora_param_count(lora_param_count, seed: int = 0) -> None:
    """``lora_param_count(d_in, d_out, r)`` must be r·(d_in + d_out), for square and non-square layers."""
    LORA_PARAM_COUNT.check(lora_param_count, seed)


def check_lora_forward(lora_forward, seed: int = 0) -> None:
    """``lora_forward(x, W0, A, B, alpha, r)`` must be x W0ᵀ + (alpha/r) · x Aᵀ Bᵀ."""
    LORA_FORWARD.check(lora_forward, seed)


def check_merge_weight(merge_weight, seed: int = 0) -> None:
    """``merge_weight(W0, A, B, alpha, r)`` must return W0 + (alpha/r)·B A, and not modify W0."""
    MERGE_WEIGHT.check(merge_weight, seed)


def check_lora_module(lora_linear_class, seed: int = 0) -> None:
    """``lora_linear_class(base: nn.Linear, r, alpha)`` must behave like ``peft_edu.LoraLinear``."""
    LORA_MODULE.check(lora_linear_class, seed)


def check_bottleneck_params(bottleneck_params, seed: int = 0) -> None:
    """``bottleneck_params(d, reduction_factor)`` must be 2·d·m + m + d with m = d // reduction_factor."""
    BOTTLENECK_PARAMS.check(bottleneck_params, seed)


def check_adapter_forward(adapter_forward, seed: int = 0) -> None:
    """``adapter_forward(h, W_down, b_down, W_up, b_up)`` must be h + W_up·ReLU(W_down·h + b_down) + b_up."""
    ADAPTER_FORWARD.check(adapter_forward, seed)


def check_ia3_scale_ffn(ia3_scale_ffn, seed: int = 0) -> None:
    """``ia3_scale_ffn(x, W, b, l)`` must be W (l ⊙ x) + b (IA³ scales the FFN's inner activation)."""
    IA3_SCALE_FFN.check(ia3_scale_ffn, seed)


def check_weight_norm(weight_norm, seed: int = 0) -> None:
    """``weight_norm(W)`` must be the L2 norm of each row of W (d_out, d_in): one number per output feature."""
    WEIGHT_NORM.check(weight_norm, seed)


def check_dora_weight(dora_weight, seed: int = 0) -> None:
    """``dora_weight(W0, A, B, m, alpha, r)`` must be m ⊙ V / ‖V‖ per row, with V = W0 + (alpha/r)·B A."""
    DORA_WEIGHT.check(dora_weight, seed)


def check_dora_forward(dora_forward, seed: int = 0) -> None:
    """``dora_forward(x, W0, A, B, m, alpha, r)``: x W'ᵀ with W' the DoRA weight; the norm is a constant in backward."""
    DORA_FORWARD.check(dora_forward, seed)


def check_prefix_param_count(prefix_param_count, seed: int = 0) -> None:
    """``prefix_param_count(n, num_layers, hidden, projection_hidden=None)`` must be PEFT's trainable count of a prefix."""
    PREFIX_PARAM_COUNT.check(prefix_param_count, seed)


def check_extend_attention_mask(extend_attention_mask, seed: int = 0) -> None:
    """``extend_attention_mask(mask, n)`` must prepend n columns of ones to the (batch, T) mask."""
    EXTEND_ATTENTION_MASK.check(extend_attention_mask, seed)


def check_prefix_attention(prefix_attention, seed: int = 0) -> None:
    """``prefix_attention(q, K, V, P_K, P_V)`` must be softmax(q [P_K; K]ᵀ / √d) [P_V; V]."""
    PREFIX_ATTENTION.check(prefix_attention, seed)


def check_gate_lambda(gate_lambda, seed: int = 0) -> None:
    """``gate_lambda(q, K, P_K)`` must be, per query, the prefix's share of the attention (the unified view's λ)."""
    GATE_LAMBDA.check(gate_lambda, seed)
