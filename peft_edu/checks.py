"""Checks behind the graded exercises: compare a learner's answer with the reference on fresh inputs.

Each ``check_*`` function takes what the learner wrote (a function or a module class) and either
returns quietly or raises ``AssertionError`` with feedback the learner can act on. Where a common
mistake has a recognisable signature (α instead of α/r, A and B swapped, B initialised randomly),
the message names it. The otter-grader tests in the chapter notebooks call these functions, and
``tests/test_checks.py`` proves that each one rejects the blank stub and plausible wrong answers.

``seed`` lets a hidden test draw different inputs from the public one, so an answer cannot be fitted
to the public test.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoraLinear


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how."""


def _fail(message: str):
    raise CheckFailed(message)


def _require_callable(obj, name: str, kind: str = "function") -> None:
    if not callable(obj):
        _fail(f"{name} is {obj!r}, not a {kind}: define it (run the cell with your code) before running the check.")


def _call(fn, *args, what: str):
    try:
        result = fn(*args)
    except NotImplementedError:
        _fail(f"{what} is not implemented yet: replace the `raise NotImplementedError` (or `...`) with your code.")
    except Exception as error:  # the learner's code crashed: say where, in their terms
        _fail(f"{what} raised {type(error).__name__}: {error}")
    if result is None or result is Ellipsis:  # the blank stub (`...`) or a forgotten `return`
        _fail(f"{what} returned {result!r}: it is not implemented yet (replace the `...` with your code), "
              "or a `return` is missing.")
    return result


def _close(a, b, atol=1e-5, rtol=1e-4) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=rtol)


# --- LoRA chapter ------------------------------------------------------------------------------
def check_lora_param_count(lora_param_count, seed: int = 0) -> None:
    """``lora_param_count(d_in, d_out, r)`` must be r·(d_in + d_out), for square and non-square layers."""
    _require_callable(lora_param_count, "lora_param_count")
    g = torch.Generator().manual_seed(seed)
    shapes = [(384, 384, 8), (384, 1536, 4), (576, 192, 16)] + [
        tuple(int(v) for v in torch.randint(2, 2048, (2,), generator=g)) + (int(torch.randint(1, 64, (1,), generator=g)),)
        for _ in range(3)
    ]
    for d_in, d_out, r in shapes:
        got = _call(lora_param_count, d_in, d_out, r, what="lora_param_count")
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


def check_lora_forward(lora_forward, seed: int = 0) -> None:
    """``lora_forward(x, W0, A, B, alpha, r)`` must be x W0ᵀ + (alpha/r) · x Aᵀ Bᵀ."""
    _require_callable(lora_forward, "lora_forward")
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r, alpha = 12, 7, 3, 6.0
    x = torch.randn(2, 5, d_in, generator=g)
    W0 = torch.randn(d_out, d_in, generator=g)
    A = torch.randn(r, d_in, generator=g)
    B = torch.randn(d_out, r, generator=g)
    got = _call(lora_forward, x, W0, A, B, alpha, r, what="lora_forward")
    want = x @ W0.T + (alpha / r) * (x @ A.T @ B.T)
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"lora_forward should return a tensor, it returned {type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The output should have shape {tuple(want.shape)} (batch, tokens, d_out), yours has {tuple(got.shape)}.")
    if _close(got, x @ W0.T + alpha * (x @ A.T @ B.T)):
        _fail("You scaled BAx by alpha; LoRA scales it by alpha / r (so changing r does not change the update's size).")
    if _close(got, x @ W0.T + (x @ A.T @ B.T)):
        _fail("The low-rank update is missing its scaling factor alpha / r.")
    if _close(got, x @ W0.T):
        _fail("Your output equals the frozen layer alone: the update (alpha/r)·B A x is missing.")
    if _close(got, (alpha / r) * (x @ A.T @ B.T)):
        _fail("Your output is the low-rank update alone: the frozen layer's term x W0ᵀ is missing.")
    if _close(got, x @ W0.T + (r / alpha) * (x @ A.T @ B.T)):
        _fail("You scaled by r / alpha; LoRA's scaling is alpha / r.")
    _fail("lora_forward(x, W0, A, B, alpha, r) does not equal x W0ᵀ + (alpha/r) · x Aᵀ Bᵀ. "
          "Check the order: x first goes through A (r×d_in), then B (d_out×r).")


def check_merge_weight(merge_weight, seed: int = 0) -> None:
    """``merge_weight(W0, A, B, alpha, r)`` must return W0 + (alpha/r)·B A, and not modify W0."""
    _require_callable(merge_weight, "merge_weight")
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r, alpha = 10, 6, 2, 16.0
    W0 = torch.randn(d_out, d_in, generator=g)
    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    W0_before = W0.clone()
    got = _call(merge_weight, W0, A, B, alpha, r, what="merge_weight")
    want = W0_before + (alpha / r) * B @ A
    if not torch.equal(W0, W0_before):
        _fail("merge_weight changed W0 in place; return a new tensor (e.g. W0 + ...), so that unmerging stays possible.")
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        _fail(f"merge_weight should return a tensor of W0's shape {tuple(W0.shape)}.")
    if _close(got, W0 + alpha * B @ A):
        _fail("You added alpha·BA; the merged update is (alpha / r)·BA, exactly what the forward pass adds.")
    if _close(got, W0 + B @ A):
        _fail("The merged update is missing its scaling alpha / r.")
    _fail("merge_weight does not return W0 + (alpha/r)·B A. Note B A (d_out×d_in) has W0's shape; A B would not.")


def check_lora_module(lora_linear_class, seed: int = 0) -> None:
    """``lora_linear_class(base: nn.Linear, r, alpha)`` must behave like ``peft_edu.LoraLinear``.

    Checked: the base layer is frozen, A is r×d_in and B is d_out×r, only A and B train, the output
    at initialisation equals the base layer's (B = 0, A random), and with the same A and B the
    output and gradients equal the reference.
    """
    _require_callable(lora_linear_class, "Your LoRA class", kind="class")
    torch.manual_seed(seed)
    d_in, d_out, r, alpha = 16, 12, 4, 8
    base = nn.Linear(d_in, d_out)
    x = torch.randn(3, d_in)
    layer = _call(lora_linear_class, base, r, alpha, what=f"{getattr(lora_linear_class, '__name__', 'your class')}(base, r, alpha)")
    if not isinstance(layer, nn.Module):
        _fail("Your class should be an nn.Module (class MyLoRALinear(nn.Module): ...).")
    for name in ("A", "B"):
        factor = getattr(layer, name, None)
        if factor is None:
            _fail(f"Your module has no `self.{name}` yet (is __init__ still the blank `...`?): in __init__, "
                  f"store the LoRA factor as `self.{name} = nn.Parameter(...)` so that it trains.")
        if not isinstance(factor, nn.Parameter):
            _fail(f"`self.{name}` is a {type(factor).__name__}, not an nn.Parameter: store the factor itself as "
                  f"`self.{name} = nn.Parameter(torch.empty(...))` (a tensor, not an nn.Linear), so that it trains.")
    if tuple(layer.A.shape) != (r, d_in) or tuple(layer.B.shape) != (d_out, r):
        _fail(f"Expected A of shape (r, d_in) = {(r, d_in)} and B of shape (d_out, r) = {(d_out, r)}; "
              f"yours are {tuple(layer.A.shape)} and {tuple(layer.B.shape)}.")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    if trainable != {"A", "B"}:
        _fail(f"Exactly A and B should require grad; trainable now: {sorted(trainable)}. Freeze the base layer "
              "(base.requires_grad_(False)).")
    if torch.count_nonzero(layer.B) != 0:
        _fail("B starts random; LoRA starts from ΔW = B A = 0, so B must be zeros (A stays random).")
    if torch.count_nonzero(layer.A) == 0:
        _fail("A starts at zero too: then ∂L/∂B = 0 and ∂L/∂A = 0, so nothing would ever train. Initialise A randomly "
              "(nn.init.kaiming_uniform_(A, a=math.sqrt(5)), as PEFT).")
    out = _call(layer, x, what="your forward")
    if not _close(out, base(x)):
        _fail("At initialisation (B = 0) your layer must return exactly what the frozen base layer returns.")
    # Same factors in the reference, then compare outputs and gradients.
    with torch.no_grad():
        layer.B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    reference = LoraLinear(base, r=r, lora_alpha=alpha)
    with torch.no_grad():
        reference.lora_A.weight.copy_(layer.A)
        reference.lora_B.weight.copy_(layer.B)
    out, want = _call(layer, x, what="your forward"), reference(x)
    if not _close(out, want):
        if _close(out, base(x) + alpha * (x @ layer.A.T @ layer.B.T)):
            _fail("Your forward scales B A x by alpha; LoRA uses alpha / r.")
        if _close(out, base(x) + (x @ layer.A.T @ layer.B.T)):
            _fail("Your forward is missing the scaling alpha / r.")
        _fail("With B ≠ 0 your output differs from base(x) + (alpha/r)·x Aᵀ Bᵀ.")
    out.sum().backward()
    want.sum().backward()
    if layer.A.grad is None or not _close(layer.A.grad, reference.lora_A.weight.grad):
        _fail("The gradient reaching A differs from the reference: is A used in the forward exactly once, "
              "as x @ A.T, without .detach()?")
    if layer.B.grad is None or not _close(layer.B.grad, reference.lora_B.weight.grad):
        _fail("The gradient reaching B differs from the reference (or is missing): is B used in the forward "
              "exactly once, as (x @ A.T) @ B.T, without .detach()?")
