"""The exercise-check cases of the lora chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations

import math

import torch
from torch import nn

from chapter_cases import Chapter

from peft_edu import checks


# --- LoRA ---------------------------------------------------------------------------------------
LORA_GENERIC = {
    "q1": r"the answer is not .* How many entries",
    "q2": r"does not equal x W0ᵀ \+ \(alpha/r\)",
    "q3": r"does not return W0 \+ \(alpha/r\)",
    "q4": r"output differs from base\(x\) \+ \(alpha/r\)",
    "q5": r"does not return s·\(B - lr·∂L/∂B\)\(A - lr·∂L/∂A\)",
}


def merge_in_place_iadd(W0, A, B, alpha, r):
    W0 += (alpha / r) * (B @ A)
    return W0


class GoodLoRA(nn.Module):
    """A correct answer to q4, written independently of the notebook; the wrong answers change one thing."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = self.freeze(base)
        d_out, d_in = base.weight.shape
        self.make_factors(d_in, d_out, r)
        self.scaling = self.scale(alpha, r)

    def freeze(self, base):
        return base.requires_grad_(False)

    def make_factors(self, d_in, d_out, r):
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r, d_in), a=math.sqrt(5)))
        self.B = nn.Parameter(torch.zeros(d_out, r))

    def scale(self, alpha, r):
        return alpha / r

    def update(self, x):
        return self.scaling * (x @ self.A.T @ self.B.T)

    def forward(self, x):
        return self.base(x) + self.update(x)


def q4_wrong(name, **overrides):
    return type(name, (GoodLoRA,), overrides)


def _random_B(self, d_in, d_out, r):
    GoodLoRA.make_factors(self, d_in, d_out, r)
    self.B = nn.Parameter(torch.randn(d_out, r))


def _zero_A(self, d_in, d_out, r):
    GoodLoRA.make_factors(self, d_in, d_out, r)
    self.A = nn.Parameter(torch.zeros(r, d_in))


def _swapped_shapes(self, d_in, d_out, r):
    self.A = nn.Parameter(torch.zeros(d_in, r))
    self.B = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r, d_out), a=math.sqrt(5)))


def _linear_submodules(self, d_in, d_out, r):
    self.A = nn.Linear(d_in, r, bias=False)
    self.B = nn.Linear(r, d_out, bias=False)
    nn.init.zeros_(self.B.weight)


def _plain_tensors(self, d_in, d_out, r):
    self.A = nn.init.kaiming_uniform_(torch.empty(r, d_in, requires_grad=True), a=math.sqrt(5))
    self.B = torch.zeros(d_out, r, requires_grad=True)


class NotAModule:
    def __init__(self, base, r, alpha):
        self.base, self.A, self.B = base, torch.zeros(r, base.in_features), torch.zeros(base.out_features, r)

    def __call__(self, x):
        return self.base(x)


class CrashingInit(nn.Module):
    def __init__(self, base, r, alpha):
        raise KeyError("alpha")


class CrashingForward(GoodLoRA):
    def forward(self, x):
        raise ValueError("bad shape")


class ForgotSuperInit(nn.Module):
    def __init__(self, base, r, alpha):
        self.A = nn.Parameter(torch.zeros(r, base.in_features))


# --- q5: one gradient step (each wrong answer changes one thing in a correct step) ---------------
def _gradients(x, grad_h, A, B, alpha, r):
    s = alpha / r
    return s * B.T @ grad_h.T @ x, s * grad_h.T @ (x @ A.T)


def step_only_B(x, grad_h, A, B, alpha, r, lr):
    _, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    return (alpha / r) * (B - lr * grad_B) @ A


def step_only_A(x, grad_h, A, B, alpha, r, lr):
    grad_A, _ = _gradients(x, grad_h, A, B, alpha, r)
    return (alpha / r) * B @ (A - lr * grad_A)


def step_B_then_A(x, grad_h, A, B, alpha, r, lr):
    """Updates B first, then takes A's gradient at the new B."""
    _, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    new_B = B - lr * grad_B
    grad_A, _ = _gradients(x, grad_h, A, new_B, alpha, r)
    return (alpha / r) * new_B @ (A - lr * grad_A)


def step_first_order(x, grad_h, A, B, alpha, r, lr):
    grad_A, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    return (alpha / r) * (B @ A - lr * grad_B @ A - lr * B @ grad_A)


def step_unscaled_gradients(x, grad_h, A, B, alpha, r, lr):
    s = alpha / r
    return s * (B - lr * grad_h.T @ (x @ A.T)) @ (A - lr * B.T @ grad_h.T @ x)


def step_unscaled_delta(x, grad_h, A, B, alpha, r, lr):
    grad_A, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    return (B - lr * grad_B) @ (A - lr * grad_A)


def step_ascent(x, grad_h, A, B, alpha, r, lr):
    grad_A, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    return (alpha / r) * (B + lr * grad_B) @ (A + lr * grad_A)


def step_full_fine_tuning(x, grad_h, A, B, alpha, r, lr):
    return (alpha / r) * B @ A - lr * grad_h.T @ x


def step_mean_over_rows(x, grad_h, A, B, alpha, r, lr):
    grad_A, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    return (alpha / r) * (B - lr * grad_B / len(x)) @ (A - lr * grad_A / len(x))


def step_in_place(x, grad_h, A, B, alpha, r, lr):
    grad_A, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    A -= lr * grad_A
    B -= lr * grad_B
    return (alpha / r) * B @ A


def step_in_float32(x, grad_h, A, B, alpha, r, lr):
    x, grad_h, A, B = x.float(), grad_h.float(), A.float(), B.float()
    grad_A, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    return (alpha / r) * (B - lr * grad_B) @ (A - lr * grad_A)


def step_transposed(x, grad_h, A, B, alpha, r, lr):
    grad_A, grad_B = _gradients(x, grad_h, A, B, alpha, r)
    return ((alpha / r) * (B - lr * grad_B) @ (A - lr * grad_A)).T


def step_loss_ignores_grad_h(x, grad_h, A, B, alpha, r, lr):
    """Autograd on the sum of h, as if ∂L/∂h were all ones."""
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    (x @ ((alpha / r) * B @ A).T).sum().backward()
    with torch.no_grad():
        return (alpha / r) * (B - lr * B.grad) @ (A - lr * A.grad)


LORA = Chapter(
    name="lora",
    questions={
        "q1": ("lora_param_count", checks.check_lora_param_count),
        "q2": ("lora_forward", checks.check_lora_forward),
        "q3": ("merge_weight", checks.check_merge_weight),
        "q4": ("MyLoRALinear", checks.check_lora_module),
        "q5": ("delta_weight_after_step", checks.check_delta_after_step),
    },
    stub_must_not_contain=("alpha / r", "d_in + d_out"),
    stub_feedback=r"not implemented yet|still the blank `\.\.\.`",
    wrong={
        "q1": [
            ("2rd_in-square-only", lambda d_in, d_out, r: 2 * r * d_in, r"2·r·d, which is right only for square"),
            ("2rd_out-square-only", lambda d_in, d_out, r: 2 * r * d_out, r"2·r·d, which is right only for square"),
            ("dense-dW", lambda d_in, d_out, r: d_in * d_out, r"d_in·d_out .* frozen W₀"),
            ("r-d_in-d_out", lambda d_in, d_out, r: r * d_in * d_out, LORA_GENERIC["q1"]),
            ("off-by-one", lambda d_in, d_out, r: r * (d_in + d_out) + 1, LORA_GENERIC["q1"]),
            ("counts-a-bias", lambda d_in, d_out, r: r * (d_in + d_out) + d_out, LORA_GENERIC["q1"]),
            ("forgets-r", lambda d_in, d_out, r: d_in + d_out, LORA_GENERIC["q1"]),
            ("r-squared", lambda d_in, d_out, r: r * r + r * (d_in + d_out), LORA_GENERIC["q1"]),
        ],
        "q2": [
            ("scaled-by-alpha", lambda x, W0, A, B, alpha, r: x @ W0.T + alpha * (x @ A.T @ B.T),
             r"scaled BAx by alpha; LoRA scales it by alpha / r"),
            ("no-scaling", lambda x, W0, A, B, alpha, r: x @ W0.T + x @ A.T @ B.T, r"missing its scaling"),
            ("r-over-alpha", lambda x, W0, A, B, alpha, r: x @ W0.T + (r / alpha) * (x @ A.T @ B.T),
             r"scaled by r / alpha"),
            ("rslora-sqrt-r", lambda x, W0, A, B, alpha, r: x @ W0.T + alpha / math.sqrt(r) * (x @ A.T @ B.T),
             LORA_GENERIC["q2"]),
            ("no-base-term", lambda x, W0, A, B, alpha, r: (alpha / r) * (x @ A.T @ B.T), r"term x W0ᵀ is missing"),
            ("base-only", lambda x, W0, A, B, alpha, r: x @ W0.T, r"frozen layer alone: the update .* is missing"),
            # Non-square W0 (7×12) makes these crash; with a square W0 the first would silently pass.
            ("W0-not-transposed", lambda x, W0, A, B, alpha, r: x @ W0 + (alpha / r) * (x @ A.T @ B.T),
             r"lora_forward raised RuntimeError"),
            ("A-and-B-swapped", lambda x, W0, A, B, alpha, r: x @ W0.T + (alpha / r) * (x @ B.T @ A.T),
             r"lora_forward raised RuntimeError"),
            ("first-example-only", lambda x, W0, A, B, alpha, r: x[0] @ W0.T + (alpha / r) * (x[0] @ A.T @ B.T),
             r"should have shape \(2, 5, 7\)"),
            ("returns-a-list", lambda x, W0, A, B, alpha, r: (x @ W0.T + (alpha / r) * (x @ A.T @ B.T)).tolist(),
             r"should return a tensor, it returned list"),
        ],
        "q3": [
            ("scaled-by-alpha", lambda W0, A, B, alpha, r: W0 + alpha * (B @ A), r"added alpha·BA"),
            ("no-scaling", lambda W0, A, B, alpha, r: W0 + B @ A, r"missing its scaling alpha / r"),
            ("r-over-alpha", lambda W0, A, B, alpha, r: W0 + (r / alpha) * (B @ A), LORA_GENERIC["q3"]),
            ("A-at-B", lambda W0, A, B, alpha, r: W0 + (alpha / r) * (A @ B), r"merge_weight raised RuntimeError"),
            ("transposed-update", lambda W0, A, B, alpha, r: W0.T + (alpha / r) * (A.T @ B.T),
             r"tensor of W0's shape"),
            ("update-only", lambda W0, A, B, alpha, r: (alpha / r) * (B @ A), LORA_GENERIC["q3"]),
            ("in-place-add_", lambda W0, A, B, alpha, r: W0.add_((alpha / r) * (B @ A)), r"changed W0 in place"),
            ("in-place-+=", merge_in_place_iadd, r"changed W0 in place"),
        ],
        "q4": [
            ("B-random-init", q4_wrong("BRandom", make_factors=_random_B), r"B starts random; .* B must be zeros"),
            ("A-zero-init", q4_wrong("AZero", make_factors=_zero_A), r"A starts at zero too"),
            ("base-not-frozen", q4_wrong("NotFrozen", freeze=lambda self, base: base),
             r"Exactly A and B should require grad; trainable now: \['A', 'B', 'base.bias', 'base.weight'\]"
             r".*Freeze the base layer"),
            ("scaled-by-alpha", q4_wrong("AlphaScale", scale=lambda self, alpha, r: alpha), r"scales B A x by alpha"),
            ("no-scaling", q4_wrong("NoScale", scale=lambda self, alpha, r: 1.0), r"missing the scaling alpha / r"),
            ("rslora-sqrt-r", q4_wrong("SqrtScale", scale=lambda self, alpha, r: alpha / math.sqrt(r)),
             LORA_GENERIC["q4"]),
            ("A-B-swapped-shapes",
             q4_wrong("Swapped", make_factors=_swapped_shapes,
                      update=lambda self, x: self.scaling * (x @ self.A @ self.B)),
             r"Expected A of shape \(r, d_in\)"),
            ("forward-without-base", q4_wrong("NoBase", forward=lambda self, x: self.update(x)),
             r"At initialisation .* must return exactly what the frozen base layer returns"),
            ("forward-forgets-bias",
             q4_wrong("NoBias", forward=lambda self, x: x @ self.base.weight.T + self.update(x)),
             r"At initialisation .* must return exactly what the frozen base layer returns"),
            ("A-detached",
             q4_wrong("DetachA", update=lambda self, x: self.scaling * (x @ self.A.detach().T @ self.B.T)),
             r"gradient reaching A differs .* without \.detach\(\)"),
            ("B-detached",
             q4_wrong("DetachB", update=lambda self, x: self.scaling * (x @ self.A.T @ self.B.detach().T)),
             r"gradient reaching B differs .* without \.detach\(\)"),
            ("nn-Linear-submodules",
             q4_wrong("LinearAB", make_factors=_linear_submodules,
                      update=lambda self, x: self.scaling * self.B(self.A(x))),
             r"`self.A` is a Linear, not an nn.Parameter"),
            ("plain-tensors-not-Parameters", q4_wrong("PlainTensors", make_factors=_plain_tensors),
             r"`self.A` is a Tensor, not an nn.Parameter"),
            ("not-an-nn-Module", NotAModule, r"should be an nn.Module"),
        ],
        "q5": [
            ("only-B-moves", step_only_B, r"You moved B but not A"),
            ("only-A-moves", step_only_A, r"You moved A but not B"),
            ("A-gradient-at-the-new-B", step_B_then_A, r"computed A's gradient with B already updated"),
            ("first-order-only", step_first_order, r"dropped the lr² term"),
            ("gradients-without-s", step_unscaled_gradients, r"gradients miss the factor s = alpha / r"),
            ("delta-without-s", step_unscaled_delta, r"returned B'A' without s"),
            ("gradient-ascent", step_ascent, r"moved up the gradient"),
            ("before-the-step", lambda x, grad_h, A, B, alpha, r, lr: (alpha / r) * B @ A, r"ΔW = s·B A before the step"),
            ("full-fine-tuning-step", step_full_fine_tuning, r"stepped on W directly"),
            ("mean-over-rows", step_mean_over_rows, r"averaged over the rows of x"),
            ("updates-in-place", step_in_place, r"changed A, B in place"),
            ("computes-in-float32", step_in_float32, r"With torch.float64 inputs you return torch.float32"),
            ("transposed", step_transposed, r"ΔW should have the layer's weight shape \(d_out, d_in\)"),
            ("ignores-grad_h", step_loss_ignores_grad_h, LORA_GENERIC["q5"]),
            ("returns-a-list", lambda *args: (step_ascent(*args)).tolist(), r"should return a tensor, it returned list"),
        ],
    },
    crashes=[
        ("q4", "init-crashes", CrashingInit, r"CrashingInit\(base, r, alpha\) raised KeyError: 'alpha'"),
        ("q4", "forward-crashes", CrashingForward, r"your forward raised ValueError: bad shape"),
        ("q4", "forgot-super-init", ForgotSuperInit,
         r"raised AttributeError: cannot assign parameters before Module.__init__"),
        ("q4", "forward-still-blank", q4_wrong("StubForward", forward=lambda self, x: None),
         r"your forward returned None: it is not implemented yet"),
    ],
)
