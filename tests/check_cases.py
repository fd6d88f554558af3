"""The cases of ``tests/test_checks.py``, chapter by chapter: the data, not the tests.

A chapter names its otter master notebook (``notebooks/<chapter>.ipynb``, whose name is also the key of
``peft_edu.checks.CHAPTERS``), maps each question to the name the student defines and the check behind its
tests, says what the blank stub must no longer contain and how the check's feedback on it reads, and lists
plausible wrong answers, each with a pattern its feedback must match: the mistake's own message where the
check claims to recognise it, the generic message (or the crash's exception type) where it does not.

The reference solutions and the student stubs are not copied here: a chapter reads them from its notebook,
and the stub is produced by otter-grader's own ``replace_solutions`` (see ``notebook_helpers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from notebook_helpers import Question, read_questions, run_cells, student_stub

from peft_edu import checks

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass
class Chapter:
    name: str                                   # the notebook's stem and the key of peft_edu.checks.CHAPTERS
    questions: dict[str, tuple[str, checks.Exercise]]  # question -> (the name the student defines, its check)
    stub_must_not_contain: tuple[str, ...]     # solution fragments the blank stub must have lost
    stub_feedback: str                          # what the check says about the blank stub (a regex)
    wrong: dict[str, list[tuple[str, object, str]]]  # question -> [(name, wrong answer, feedback pattern)]
    crashes: list[tuple[str, str, object, str]] = field(default_factory=list)  # extra (question, name, answer, pattern)
    fitted_by_hand: tuple[str, ...] = ()        # questions whose fitted-answer test is the chapter's own

    @cached_property
    def notebook(self) -> dict[str, Question]:
        return read_questions(NOTEBOOKS / f"{self.name}.ipynb")

    def check(self, q: str) -> checks.Exercise:
        return self.questions[q][1]

    def reference(self, q: str):
        return run_cells(self.notebook[q].solution)[self.questions[q][0]]

    def stub(self, q: str):
        return run_cells([student_stub(s) for s in self.notebook[q].solution])[self.questions[q][0]]

    def seeds(self, q: str) -> list[int]:
        """The public test's seed (0) and the hidden tests' seeds, as the notebook has them."""
        return [0] + self.notebook[q].hidden_seeds


# --- LoRA ---------------------------------------------------------------------------------------
LORA_GENERIC = {
    "q1": r"the answer is not .* How many entries",
    "q2": r"does not equal x W0ᵀ \+ \(alpha/r\)",
    "q3": r"does not return W0 \+ \(alpha/r\)",
    "q4": r"output differs from base\(x\) \+ \(alpha/r\)",
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


LORA = Chapter(
    name="lora",
    questions={
        "q1": ("lora_param_count", checks.check_lora_param_count),
        "q2": ("lora_forward", checks.check_lora_forward),
        "q3": ("merge_weight", checks.check_merge_weight),
        "q4": ("MyLoRALinear", checks.check_lora_module),
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


DORA = Chapter(
    name="dora",
    questions={
        "q1": ("weight_norm", checks.check_weight_norm),
        "q2": ("dora_weight", checks.check_dora_weight),
        "q3": ("dora_forward", checks.check_dora_forward),
    },
    stub_must_not_contain=("vector_norm", "alpha / r"),
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
    },
    fitted_by_hand=("q3",),  # a replayed output has no gradients: test_dora_q3_memorised_output_...
)


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


# --- prompt methods -----------------------------------------------------------------------------
PROMPT_GENERIC = {
    "q1": r"the answer is not .* Count the trainable tensors",
    "q2": r"does not return \[1ⁿ; mask\]",
    "q3": r"does not equal softmax\(q \[P_K; K\]ᵀ",
    "q4": r"does not equal Σ exp",
}


def _ppc(n, L, d, h=None, *, two=2, layers=True, biases=True, table_too=False):
    out = two * (L if layers else 1) * d
    if h is None:
        return n * out
    total = n * d + d * h + h * out + ((h + out) if biases else 0)
    return total + (n * out if table_too else 0)


def _softmax_attention(q, K, V, scale=True):
    s = q @ K.T
    if scale:
        s = s / q.shape[-1] ** 0.5
    return torch.softmax(s, dim=-1) @ V


def _gate(q, K, P_K, scale=True, reduce="sum"):
    c = q.shape[-1] ** 0.5 if scale else 1.0
    a, b = (q @ P_K.T / c).exp(), (q @ K.T / c).exp()
    a, b = (a.sum(-1), b.sum(-1)) if reduce == "sum" else (a.mean(-1), b.mean(-1))
    return a / (a + b)


PROMPT_METHODS = Chapter(
    name="prompt_methods",
    questions={
        "q1": ("prefix_param_count", checks.check_prefix_param_count),
        "q2": ("extend_attention_mask", checks.check_extend_attention_mask),
        "q3": ("prefix_attention", checks.check_prefix_attention),
        "q4": ("gate_lambda", checks.check_gate_lambda),
    },
    stub_must_not_contain=("softmax", "torch.cat", "2 * num_layers"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("forgets-K-and-V", lambda n, L, d, h=None: _ppc(n, L, d, h, two=1), r"factor 2 is missing"),
            ("one-layer-only", lambda n, L, d, h=None: _ppc(n, L, d, h, layers=False), r"one layer's prefix"),
            ("prompt-tuning-count", lambda n, L, d, h=None: n * d, r"prompt tuning's soft prompt"),
            ("mlp-without-biases", lambda n, L, d, h=None: _ppc(n, L, d, h, biases=False), r"biases .* are missing"),
            ("mlp-counts-the-table-too", lambda n, L, d, h=None: _ppc(n, L, d, h, table_too=True),
             r"added the table P"),
            ("mlp-counts-only-the-table", lambda n, L, d, h=None: n * 2 * L * d, r"size of the table P"),
            ("ignores-the-projection", lambda n, L, d, h=None: _ppc(n, L, d, None) + 1, PROMPT_GENERIC["q1"]),
        ],
        "q2": [
            ("appends-ones", lambda m, n: torch.cat([m, m.new_ones(m.shape[0], n)], 1), r"appended the ones"),
            ("prepends-zeros", lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1), r"prepended zeros"),
            ("appends-zeros", lambda m, n: torch.cat([m, m.new_zeros(m.shape[0], n)], 1), r"appended zeros"),
            ("repeats-first-column", lambda m, n: torch.cat([m[:, :1].repeat(1, n), m], 1), r"first column"),
            ("float-mask", lambda m, n: torch.cat([torch.ones(m.shape[0], n), m.float()], 1),
             r"keep the mask's dtype"),
            ("n-rows-not-columns", lambda m, n: torch.cat([m.new_ones(n, m.shape[1]), m], 0), r"should have shape"),
            ("modifies-in-place", lambda m, n: torch.cat([m.new_ones(m.shape[0], n), m.zero_().add_(1)], 1),
             r"changed the mask in place"),
            ("all-ones", lambda m, n: m.new_ones(m.shape[0], m.shape[1] + n), PROMPT_GENERIC["q2"]),
        ],
        "q3": [
            ("real-keys-only", lambda q, K, V, PK, PV: _softmax_attention(q, K, V), r"ignores the prefix"),
            ("two-softmaxes-summed",
             lambda q, K, V, PK, PV: _softmax_attention(q, PK, PV) + _softmax_attention(q, K, V),
             r"two separately normalised"),
            ("unscaled",
             lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([PV, V]), scale=False),
             r"not scaled"),
            ("keys-values-misaligned",
             lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([V, PV])),
             r"not in the same order"),
            ("softmax-over-queries", lambda q, K, V, PK, PV:
                torch.softmax(q @ torch.cat([PK, K]).T / q.shape[-1] ** 0.5, dim=0) @ torch.cat([PV, V]),
             r"wrong axis"),
            ("prefix-as-queries", lambda q, K, V, PK, PV: _softmax_attention(torch.cat([PK, q]), torch.cat([PK, K]),
                                                                             torch.cat([PV, V])),
             r"should have shape"),
            ("P_K-as-values",
             lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([PK[:, :V.shape[1]], V])),
             PROMPT_GENERIC["q3"]),
        ],
        "q4": [
            ("one-minus-lambda", lambda q, K, PK: 1 - _gate(q, K, PK), r"1 − λ"),
            ("unscaled", lambda q, K, PK: _gate(q, K, PK, scale=False), r"not scaled"),
            ("means-not-sums", lambda q, K, PK: _gate(q, K, PK, reduce="mean"), r"averaged the exponentials"),
            ("counts-keys", lambda q, K, PK: torch.full((q.shape[0],), PK.shape[0] / (PK.shape[0] + K.shape[0])),
             r"not a count of keys"),
            ("keepdim-shape", lambda q, K, PK: _gate(q, K, PK)[:, None], r"Right values, but shape"),
            ("scores-not-exponentials",
             lambda q, K, PK: (q @ PK.T).sum(-1) / ((q @ PK.T).sum(-1) + (q @ K.T).sum(-1)),
             PROMPT_GENERIC["q4"]),
        ],
    },
)

CHAPTERS = {chapter.name: chapter for chapter in (LORA, DORA, ADAPTERS, PROMPT_METHODS)}
