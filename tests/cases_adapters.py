"""The exercise-check cases of the adapters chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations


import torch
from torch import nn

from chapter_cases import Chapter

from peft_edu import checks


# --- adapters -----------------------------------------------------------------------------------
def _m(d, f):
    return d // f


def _adapter_starting_with(initialise, freeze=()):
    """A q4 answer: the cell's adapter h + up(ReLU(down(h))), its parameters set by ``initialise(down, up)``."""

    class Adapter(nn.Module):
        def __init__(self, d, m):
            super().__init__()
            self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)
            with torch.no_grad():
                initialise(self.down, self.up)
            for name in freeze:
                self.get_parameter(name).requires_grad_(False)

        def forward(self, h):
            return h + self.up(torch.relu(self.down(h)))

    return Adapter


def _zero(*tensors):
    for tensor in tensors:
        tensor.zero_()


ADAPTERS = Chapter(
    name="adapters",
    questions={
        "q1": ("bottleneck_params", checks.check_bottleneck_params),
        "q2": ("adapter_forward", checks.check_adapter_forward),
        "q3": ("ia3_scale_ffn", checks.check_ia3_scale_ffn),
        "q4": ("IdentityInitAdapter", checks.check_identity_init),
    },
    stub_must_not_contain=("W_down.T", "W_up.T", "2 * d * m", "(x * l)", "zeros_"),
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
            ("no-down-bias", lambda h, Wd, bd, Wu, bu: h + torch.relu(h @ Wd.T) @ Wu.T + bu, r"A bias is missing"),
            ("up-down-swapped", lambda h, Wd, bd, Wu, bu: h + torch.relu(h @ Wu.T + bu) @ Wd.T + bd,
             r"adapter_forward raised RuntimeError"),
            ("article-formula", lambda h, Wd, bd, Wu, bu: h + torch.relu(h @ Wd.T @ Wu.T) @ Wd.T @ Wu.T,
             r"does not equal h \+ W_up·ReLU"),
            ("computes-in-float32", lambda h, Wd, bd, Wu, bu: h.float() + torch.relu(h.float() @ Wd.float().T + bd.float())
             @ Wu.float().T + bu.float(), r"Right values, but your result is torch.float32 for torch.float64 inputs"),
        ],
        "q3": [
            ("scales-output", lambda x, W, b, l: (x @ W.T + b) * l, r"scaled the layer's output"),
            ("scales-output-not-bias", lambda x, W, b, l: (x @ W.T) * l + b, r"scaled the layer's output"),
            ("no-bias", lambda x, W, b, l: (x * l) @ W.T, r"bias b is missing"),
            ("scales-bias-too", lambda x, W, b, l: (x * l) @ W.T + b * l, r"scaled the bias too"),
            ("ignores-l", lambda x, W, b, l: x @ W.T + b, r"l is not used"),
            ("W-not-transposed", lambda x, W, b, l: (x * l) @ W + b,
             r"does not equal W \(l ⊙ x\) \+ b|raised RuntimeError"),
            ("computes-in-float32", lambda x, W, b, l: (x.float() * l.float()) @ W.float().T + b.float(),
             r"Right values, but your result is torch.float32 for torch.(float64|bfloat16) inputs"),
        ],
        "q4": [
            ("both-projections-zero", _adapter_starting_with(lambda down, up: _zero(*down.parameters(), *up.parameters())),
             r"it can never learn"),
            ("down-weight-zero", _adapter_starting_with(lambda down, up: _zero(down.weight, *up.parameters())),
             r"the same for every token|it can never learn"),
            ("up-weight-zero-bias-kept", _adapter_starting_with(lambda down, up: _zero(up.weight)),
             r"the up-projection's bias b_up is added to every token"),
            ("near-identity", _adapter_starting_with(lambda down, up: (up.weight.normal_(std=1e-4), _zero(up.bias))),
             r"Close to the identity, but not exactly"),
            ("up-zero-and-frozen", _adapter_starting_with(lambda down, up: _zero(*up.parameters()),
                                                          freeze=("up.weight", "up.bias")),
             r"must train \(requires_grad\)"),
            # LoRA zeroes one factor and keeps the other random; here zeroing the down-projection instead of the
            # up-projection is the identity too, but ReLU'(0) = 0 stops every gradient to the projections
            ("down-zeroed-instead", _adapter_starting_with(lambda down, up: _zero(*down.parameters(), up.bias)),
             r"it can never learn"),
        ],
    },
)
