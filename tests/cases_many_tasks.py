"""The exercise-check cases of "One base model, many tasks" (see ``check_cases`` for what a case holds)."""

from __future__ import annotations

import math

import torch

from chapter_cases import Chapter

from peft_edu import checks


# --- Exercise 1: one layer of a mixed batch ------------------------------------------------------------------
def _mixed(x, weight, A, B, scaling, rows):
    return x @ weight.T + scaling * torch.bmm(torch.bmm(x, A[rows].transpose(1, 2)), B[rows].transpose(1, 2))


# --- Exercise 2: the linear combination ----------------------------------------------------------------------
def _split(As, Bs, on_A, on_B):
    return (Bs * on_B.view(-1, 1, 1)).sum(0) @ (As * on_A.view(-1, 1, 1)).sum(0)


def _signed_root(p):
    return p.sign() * p.abs().sqrt()


# --- Exercise 3: the sign election ---------------------------------------------------------------------------
def _agrees(stacked, votes):
    return stacked.sign() == torch.where(votes >= 0, 1, -1).to(stacked.dtype)


MANY_TASKS = Chapter(
    name="many_tasks",
    questions={
        "q1": ("mixed_lora_layer", checks.check_mixed_lora_layer),
        "q2": ("linear_delta", checks.check_linear_delta),
        "q3": ("agrees_with_sign", checks.check_agrees_with_sign),
    },
    stub_must_not_contain=("bmm", "sqrt", "torch.where"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("adapter-0-everywhere", lambda x, W, A, B, s, rows: _mixed(x, W, A, B, s, torch.zeros_like(rows)),
             r"every row went through adapter 0"),
            ("by-position", lambda x, W, A, B, s, rows: _mixed(x, W, A, B, s, torch.arange(len(rows)) % A.shape[0]),
             r"row i went through adapter i"),
            ("no-scaling", lambda x, W, A, B, s, rows: _mixed(x, W, A, B, 1.0, rows), r"not multiplied by scaling"),
            ("no-base", lambda x, W, A, B, s, rows: _mixed(x, W * 0, A, B, s, rows), r"x W₀ᵀ is missing"),
            ("base-only", lambda x, W, A, B, s, rows: x @ W.T, r"base layer's x W₀ᵀ alone"),
            ("all-adapters", lambda x, W, A, B, s, rows: x @ W.T + sum(
                _mixed(x, W * 0, A, B, s, torch.full_like(rows, a)) for a in range(A.shape[0])),
             r"updates of all adapters"),
            ("float32-out", lambda x, W, A, B, s, rows: _mixed(x.float(), W.float(), A.float(), B.float(), s, rows),
             r"keep the inputs' dtype|returned float32"),
            ("scaling-squared", lambda x, W, A, B, s, rows: _mixed(x, W, A, B, s * s, rows),
             r"mixed_lora_layer gives other values in rows"),
            ("a-list", lambda x, W, A, B, s, rows: _mixed(x, W, A, B, s, rows).tolist(), r"returned a list"),
        ],
        "q2": [
            ("exact-sum", lambda As, Bs, s, w: sum(w[i] * s[i] * Bs[i] @ As[i] for i in range(len(w))),
             r"exact sum of the updates"),
            ("no-scalings", lambda As, Bs, s, w: _split(As, Bs, _signed_root(w), w.abs().sqrt()),
             r"scalings sᵢ are left out"),
            ("sign-dropped", lambda As, Bs, s, w: _split(As, Bs, (w * s).abs().sqrt(), (w * s).abs().sqrt()),
             r"negative weight was taken as positive"),
            ("sign-on-both", lambda As, Bs, s, w: _split(As, Bs, _signed_root(w * s), _signed_root(w * s)),
             r"sign of wᵢsᵢ is on both factors"),
            ("not-square-rooted", lambda As, Bs, s, w: _split(As, Bs, w * s, w * s), r"not split as a square root"),
            ("all-on-A", lambda As, Bs, s, w: _split(As, Bs, w * s, torch.ones_like(w)), r"not split as a square root"),
            ("A-times-B", lambda As, Bs, s, w: (_split(As, Bs, _signed_root(w * s), (w * s).abs().sqrt())).T,
             r"returned shape|linear_delta gives other values"),
            ("mean-not-sum", lambda As, Bs, s, w: _split(As, Bs, _signed_root(w * s), (w * s).abs().sqrt())
             / len(w) ** 2 * math.e, r"linear_delta gives other values"),
        ],
        "q3": [
            ("frequency", lambda t: _agrees(t, t.sign().sum(0)), r"counting the adapters' signs"),
            ("minus-on-tie", lambda t: t.sign() == torch.where(t.sum(0) > 0, 1, -1).to(t.dtype),
             r"elect −1"),
            ("sign-of-zero", lambda t: t.sign() == t.sum(0).sign(), r"sign\(\) gives 0"),
            ("zero-agrees", lambda t: (t >= 0) == (t.sum(0) >= 0), r"pruned entry \(0\) counts as agreeing"),
            ("elected-sign-only", lambda t: torch.where(t.sum(0) >= 0, 1, -1), r"one value per entry"),
            ("float-mask", lambda t: _agrees(t, t.sum(0)).to(t.dtype), r"return a torch\.bool mask"),
            ("largest-entry-decides", lambda t: t.sign() == t.gather(0, t.abs().argmax(0, keepdim=True)).sign(),
             r"agrees_with_sign differs at"),
        ],
    },
)
