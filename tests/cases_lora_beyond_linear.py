"""The exercise-check cases of the lora_beyond_linear chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations


import torch

from chapter_cases import Chapter

from peft_edu import checks


# --- Exercise 1: LoRA's lookup on an embedding ----------------------------------------------------
def _update(tokens, A, B):
    return A.T[tokens] @ B.T


def _dense_delta_rows(tokens, table, A, B, scaling):
    return table[tokens] + scaling * (B @ A)[tokens]  # rows of the (dim × vocab) ΔW: the wrong axis


def _embedding_in_place(tokens, table, A, B, scaling):
    table += scaling * (B @ A).T  # merges into the caller's table
    return table[tokens]


# --- Exercise 2: merging into a Conv1D weight -------------------------------------------------------
def _merge_in_place(weight, A, B, scaling):
    weight += scaling * (B @ A).T
    return weight


# --- Exercise 3: PiSSA's residual ----------------------------------------------------------------------
def _top(W, r, bottom=False, values=True):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    pick = slice(len(S) - r, len(S)) if bottom else slice(0, r)
    return (U[:, pick] * (S[pick] if values else 1)) @ Vh[pick]


def _residual_in_place(W, r):
    W -= _top(W, r)
    return W


def _residual_by_factors_without_dividing(W, r, scaling=2.0):
    # B A = the top part, then W - s·BA: the residual of a PiSSA that forgot to divide S by s
    return W - scaling * _top(W, r)


LORA_BEYOND_LINEAR = Chapter(
    name="lora_beyond_linear",
    questions={
        "q1": ("embedding_lora_forward", checks.check_embedding_lora_forward),
        "q2": ("merge_conv1d", checks.check_merge_conv1d),
        "q3": ("pissa_residual", checks.check_pissa_residual),
    },
    stub_must_not_contain=("A.T[tokens]", "(B @ A).T", "linalg.svd", "svd.U"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("lookup-only", lambda tokens, table, A, B, scaling: table[tokens], r"frozen lookup table\[tokens\] only"),
            ("update-only", lambda tokens, table, A, B, scaling: scaling * _update(tokens, A, B), r"update .* only"),
            ("no-scaling", lambda tokens, table, A, B, scaling: table[tokens] + _update(tokens, A, B),
             r"missing its scaling"),
            ("lookup-scaled-too", lambda tokens, table, A, B, scaling: scaling * (table[tokens] + _update(tokens, A, B)),
             r"scaled the frozen lookup too"),
            ("rows-of-dense-delta", _dense_delta_rows, r"raised IndexError"),
            ("A-rows", lambda tokens, table, A, B, scaling: table[tokens] + scaling * A[tokens] @ B.T,
             r"raised IndexError"),
            ("B-not-transposed", lambda tokens, table, A, B, scaling: table[tokens] + scaling * A.T[tokens] @ B,
             r"raised RuntimeError"),
            ("in-place", _embedding_in_place, r"changed one of its inputs in place"),
            ("list", lambda tokens, table, A, B, scaling: (table[tokens] + scaling * _update(tokens, A, B)).tolist(),
             r"should return a tensor, it returned list"),
        ],
        "q2": [
            ("not-transposed", lambda weight, A, B, scaling: weight + scaling * (B @ A),
             r"added s·BA as it is: that is nn.Linear's layout"),
            ("linear-layout", lambda weight, A, B, scaling: weight.T + scaling * (B @ A),
             r"merged weight in nn.Linear's layout"),
            ("no-scaling", lambda weight, A, B, scaling: weight + (B @ A).T, r"missing its scaling"),
            ("unmerge", lambda weight, A, B, scaling: weight - scaling * (B @ A).T, r"that is unmerging"),
            ("divided-by-scaling", lambda weight, A, B, scaling: weight + (B @ A).T / scaling,
             r"does not equal weight \+ scaling · \(BA\)ᵀ"),
            ("in-place", _merge_in_place, r"changed its inputs in place"),
            ("float32", lambda weight, A, B, scaling: weight.float() + scaling * (B.float() @ A.float()).T,
             r"returned float32 for float64 inputs"),
        ],
        "q3": [
            ("W-itself", lambda W, r: W.clone(), r"returned W itself"),
            ("the-top-part", lambda W, r: _top(W, r), r"returned the top-r part"),
            ("smallest-directions", lambda W, r: W - _top(W, r, bottom=True), r"r smallest singular directions"),
            ("without-singular-values", lambda W, r: W - _top(W, r, values=False), r"without the singular values"),
            ("s-times-the-top", _residual_by_factors_without_dividing, r"does not equal W − U_r diag\(S_r\) V_rᵀ"),
            ("one-direction-too-many", lambda W, r: W - _top(W, r + 1), r"does not equal W − U_r diag\(S_r\) V_rᵀ"),
            ("float32", lambda W, r: W.float() - _top(W.float(), r), r"returned float32 for float64 inputs"),
            ("in-place", _residual_in_place, r"changed W in place"),
            ("list", lambda W, r: (W - _top(W, r)).tolist(), r"should return a tensor, it returned list"),
        ],
    },
)
