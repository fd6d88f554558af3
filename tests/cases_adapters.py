"""The exercise-check cases of the adapters chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations


import torch

from chapter_cases import Chapter

from peft_edu import checks


# --- adapters -----------------------------------------------------------------------------------
def _m(d, f):
    return d // f


ADAPTERS = Chapter(
    name="adapters",
    questions={
        "q1": ("bottleneck_params", checks.check_bottleneck_params),
        "q2": ("adapter_forward", checks.check_adapter_forward),
        "q3": ("ia3_scale_ffn", checks.check_ia3_scale_ffn),
    },
    stub_must_not_contain=("relu", "W_up.T", "2 * d * m"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("weights-only", lambda d, f: 2 * d * _m(d, f), r"the two weight matrices only"),
            ("no-up-bias", lambda d, f: 2 * d * _m(d, f) + _m(d, f), r"one of the two biases is missing"),
            ("no-down-bias", lambda d, f: 2 * d * _m(d, f) + d, r"one of the two biases is missing"),
            ("one-projection", lambda d, f: d * _m(d, f) + _m(d, f), r"counts one projection only"),
            ("float-bottleneck", lambda d, f: 2 * d * (d / f) + d / f + d, r"whole number of units"),
            ("lora-style", lambda d, f: _m(d, f) * (d + d), r"the two weight matrices only"),
            ("off-by-one", lambda d, f: 2 * d * _m(d, f) + _m(d, f) + d + 1, r"the answer is not .* count the weights"),
        ],
        "q2": [
            ("no-residual", lambda h, Wd, bd, Wu, bu: torch.relu(h @ Wd.T + bd) @ Wu.T + bu,
             r"residual \(skip\) connection"),
            ("relu-after-up", lambda h, Wd, bd, Wu, bu: h + torch.relu((h @ Wd.T + bd) @ Wu.T + bu),
             r"ReLU is in the wrong place"),
            ("relu-after-residual", lambda h, Wd, bd, Wu, bu: torch.relu(h + torch.relu(h @ Wd.T + bd) @ Wu.T + bu),
             r"apply the ReLU to the sum"),
            ("no-activation", lambda h, Wd, bd, Wu, bu: h + (h @ Wd.T + bd) @ Wu.T + bu, r"non-linearity is missing"),
            ("no-biases", lambda h, Wd, bd, Wu, bu: h + torch.relu(h @ Wd.T) @ Wu.T, r"A bias is missing"),
            ("up-down-swapped", lambda h, Wd, bd, Wu, bu: h + torch.relu(h @ Wu.T + bu) @ Wd.T + bd,
             r"adapter_forward raised RuntimeError"),
            ("article-formula", lambda h, Wd, bd, Wu, bu: h + torch.relu(h @ Wd.T @ Wu.T) @ Wd.T @ Wu.T,
             r"does not equal h \+ W_up·ReLU"),
        ],
        "q3": [
            ("scales-output", lambda x, W, b, l: (x @ W.T + b) * l, r"scaled the layer's output"),
            ("scales-output-not-bias", lambda x, W, b, l: (x @ W.T) * l + b, r"scaled the layer's output"),
            ("no-bias", lambda x, W, b, l: (x * l) @ W.T, r"bias b is missing"),
            ("scales-bias-too", lambda x, W, b, l: (x * l) @ W.T + b * l, r"scaled the bias too|raised RuntimeError"),
            ("ignores-l", lambda x, W, b, l: x @ W.T + b, r"l is not used"),
            ("W-not-transposed", lambda x, W, b, l: (x * l) @ W + b,
             r"does not equal W \(l ⊙ x\) \+ b|raised RuntimeError"),
        ],
    },
)
