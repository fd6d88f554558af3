"""The exercise-check cases of the dora chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations


import torch

from chapter_cases import Chapter

from peft_edu import checks


# --- DoRA ---------------------------------------------------------------------------------------
def _V(W0, A, B, alpha, r):
    return W0 + (alpha / r) * (B @ A)


def _rows(V):
    return torch.linalg.vector_norm(V, dim=1, keepdim=True)


def _cols(V):
    return torch.linalg.vector_norm(V, dim=0, keepdim=True)


def _in_place(W0, A, B, m, alpha, r):
    W0 += (alpha / r) * (B @ A)
    return m[:, None] * W0 / _rows(W0)


def _forward_through_norm(x, W0, A, B, m, alpha, r):
    V = _V(W0, A, B, alpha, r)
    return x @ (m[:, None] * V / _rows(V)).T


def _forward_detaches_A(x, W0, A, B, m, alpha, r):
    V = _V(W0, A.detach(), B, alpha, r)
    return x @ (m[:, None] * V / _rows(V).detach()).T


def _forward_no_grad(x, W0, A, B, m, alpha, r):
    with torch.no_grad():
        V = _V(W0, A, B, alpha, r)
        return x @ (m[:, None] * V / _rows(V)).T


def _along(V, G, norm=_rows):
    unit = V / norm(V)
    return (G * unit).sum(dim=1 if norm is _rows else 0, keepdim=True) * unit


def _through_norm_by_autograd(V, m, G, cast=None):
    """The experiment done right (autograd twice, exact minus detached), optionally in another dtype."""
    grads = []
    for detach in (False, True):
        leaf = (V if cast is None else V.to(cast)).clone().requires_grad_(True)
        norm = _rows(leaf)
        weight = m.to(leaf.dtype)[:, None] * leaf / (norm.detach() if detach else norm)
        (weight * G.to(leaf.dtype)).sum().backward()
        grads.append(leaf.grad)
    return grads[0] - grads[1]


def _through_norm_in_place(V, m, G):
    V /= _rows(V)  # the unit direction, written over the caller's V
    return -(m[:, None] / _rows(V)) * (G * V).sum(dim=1, keepdim=True) * V


DORA = Chapter(
    name="dora",
    questions={
        "q1": ("weight_norm", checks.check_weight_norm),
        "q2": ("dora_weight", checks.check_dora_weight),
        "q3": ("dora_forward", checks.check_dora_forward),
        "q4": ("gradient_through_norm", checks.check_gradient_through_norm),
    },
    stub_must_not_contain=("vector_norm", "alpha / r", "backward"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("wrong-axis-dim0", lambda W: torch.linalg.vector_norm(W, dim=0),
             r"wrong axis: one number per input feature"),
            ("frobenius", lambda W: torch.linalg.vector_norm(W), r"norm of the whole matrix"),
            ("keepdim", lambda W: torch.linalg.vector_norm(W, dim=1, keepdim=True),
             r"Right values, but shape \(d_out, 1\)"),
            ("squared", lambda W: (W ** 2).sum(dim=1), r"squared norms"),
            ("L1", lambda W: W.abs().sum(dim=1), r"does not equal the L2 norm of each row"),
            ("max-abs", lambda W: W.abs().amax(dim=1), r"does not equal the L2 norm of each row"),
            ("list", lambda W: torch.linalg.vector_norm(W, dim=1).tolist(), r"should return a tensor, it returned list"),
        ],
        "q2": [
            ("wrong-axis",
             lambda W0, A, B, m, alpha, r: m[:, None] * _V(W0, A, B, alpha, r) / _cols(_V(W0, A, B, alpha, r)),
             r"normalised over the wrong axis"),
            ("no-scaling", lambda W0, A, B, m, alpha, r: m[:, None] * (W0 + B @ A) / _rows(W0 + B @ A),
             r"missing its scaling alpha / r"),
            ("scaled-by-alpha",
             lambda W0, A, B, m, alpha, r: m[:, None] * (W0 + alpha * B @ A) / _rows(W0 + alpha * B @ A),
             r"scaled BA by alpha"),
            ("norm-of-W0", lambda W0, A, B, m, alpha, r: m[:, None] * _V(W0, A, B, alpha, r) / _rows(W0),
             r"divided by the norm of W0"),
            ("no-magnitude", lambda W0, A, B, m, alpha, r: _V(W0, A, B, alpha, r) / _rows(_V(W0, A, B, alpha, r)),
             r"direction V/‖V‖ only"),
            ("not-normalised", lambda W0, A, B, m, alpha, r: m[:, None] * _V(W0, A, B, alpha, r),
             r"did not normalise V"),
            ("plain-lora", lambda W0, A, B, m, alpha, r: _V(W0, A, B, alpha, r), r"returned the LoRA weight"),
            ("m-over-columns",
             lambda W0, A, B, m, alpha, r: _V(W0, A, B, alpha, r) / _rows(_V(W0, A, B, alpha, r)) * m,
             r"dora_weight raised RuntimeError"),
            ("in-place", _in_place, r"changed W0 in place"),
        ],
        "q3": [
            ("norm-not-detached", _forward_through_norm, r"gradient flows through ‖V‖.*Detach it"),
            ("wrong-axis", lambda x, W0, A, B, m, alpha, r: x @ (m[:, None] * _V(W0, A, B, alpha, r)
                                                                  / _cols(_V(W0, A, B, alpha, r)).detach()).T,
             r"normalised over the wrong axis"),
            ("no-scaling",
             lambda x, W0, A, B, m, alpha, r: x @ (m[:, None] * (W0 + B @ A) / _rows(W0 + B @ A).detach()).T,
             r"missing its scaling alpha / r"),
            ("plain-lora", lambda x, W0, A, B, m, alpha, r: x @ _V(W0, A, B, alpha, r).T, r"plain LoRA"),
            ("no-magnitude",
             lambda x, W0, A, B, m, alpha, r: x @ (_V(W0, A, B, alpha, r) / _rows(_V(W0, A, B, alpha, r))).T,
             r"magnitude m is missing"),
            ("W0-not-transposed", lambda x, W0, A, B, m, alpha, r: x @ (m[:, None] * _V(W0, A, B, alpha, r)
                                                                         / _rows(_V(W0, A, B, alpha, r)).detach()),
             r"dora_forward raised RuntimeError"),
            ("A-detached", _forward_detaches_A, r"No gradient reaches A: .*no \.detach\(\)"),
            ("under-no-grad", _forward_no_grad, r"No gradient reaches A, B, m"),
        ],
        "q4": [
            ("nothing-changes", lambda V, m, G: torch.zeros_like(V), r"zeros, as if detaching changed nothing"),
            ("detached-minus-exact", lambda V, m, G: (m[:, None] / _rows(V)) * _along(V, G), r"wrong sign"),
            ("the-detached-gradient", lambda V, m, G: (m[:, None] / _rows(V)) * G, r"detached gradient \(m/‖V‖\)·G"),
            ("the-exact-gradient", lambda V, m, G: (m[:, None] / _rows(V)) * (G - _along(V, G)),
             r"whole exact gradient"),
            ("no-scale", lambda V, m, G: -_along(V, G), r"factor m/‖V‖ .* is missing"),
            ("on-V-not-unit", lambda V, m, G: -(m[:, None] / _rows(V)) * (G * V).sum(dim=1, keepdim=True) * V,
             r"unit direction V/‖V‖"),
            ("wrong-axis", lambda V, m, G: -(m[:, None] / _rows(V)) * _along(V, G, norm=_cols), r"wrong axis"),
            ("only-m-forgotten", lambda V, m, G: -_along(V, G) / _rows(V), r"is not the part of ∂L/∂V"),
            ("computed-in-float32", lambda V, m, G: _through_norm_by_autograd(V, m, G, cast=torch.float32),
             r"returned float32 for float64 inputs"),
            ("in-place", _through_norm_in_place, r"changed V, m or G in place"),
        ],
    },
    fitted_by_hand=("q3",),  # a replayed output has no gradients: test_dora_q3_memorised_output_...
)
