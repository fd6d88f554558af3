"""The exercise checks (``peft_edu.checks``) accept the reference and reject the stub and wrong answers.

The ground rule of the course: an exercise check must reject the blank stub and plausible wrong
answers. The reference solutions and the student stubs are not copied here: they are read from the
otter master notebook (``notebooks/lora.ipynb``), and the stub is produced by otter-grader's own
``otter.assign.solutions.replace_solutions``, so these tests see exactly what students get and fail
if someone edits a solution in the notebook wrongly. The seeds of the hidden tests are read from the
notebook's ``# HIDDEN`` test cells too.

Each wrong answer comes with a pattern that its feedback must match: the mistake's own message
where the check claims to recognise it, the generic message (or the crash's exception type) where
it does not.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from notebook_helpers import assert_helpful, read_questions, rejected, run_cells, student_stub

from peft_edu import checks
from peft_edu.checks import CheckFailed

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lora.ipynb"

# question name -> (the name the student defines, the check behind the question's tests)
QUESTIONS = {
    "q1": ("lora_param_count", checks.check_lora_param_count),
    "q2": ("lora_forward", checks.check_lora_forward),
    "q3": ("merge_weight", checks.check_merge_weight),
    "q4": ("MyLoRALinear", checks.check_lora_module),
}


NB_QUESTIONS = read_questions(NOTEBOOK)


def reference(q: str):
    return run_cells(NB_QUESTIONS[q].solution)[QUESTIONS[q][0]]


def stub(q: str):
    return run_cells([student_stub(s) for s in NB_QUESTIONS[q].solution])[QUESTIONS[q][0]]


def seeds(q: str) -> list[int]:
    """The public test's seed (0) and the hidden tests' seeds, as the notebook has them."""
    return [0] + NB_QUESTIONS[q].hidden_seeds


SEED_CASES = [pytest.param(q, seed, id=f"{q}-seed{seed}") for q in QUESTIONS for seed in seeds(q)]


# --- the notebook itself -------------------------------------------------------------------------
def test_notebook_has_the_four_questions_with_solutions_and_tests():
    assert set(NB_QUESTIONS) == set(QUESTIONS)
    for q, question in NB_QUESTIONS.items():
        assert question.solution, f"{q} has no solution cell"
        assert question.public_tests and question.hidden_tests, f"{q} needs a public and a hidden test"
        assert question.hidden_seeds and 0 not in question.hidden_seeds, f"{q}'s hidden test must use another seed"
        assert all(QUESTIONS[q][1].__name__ in test for test in question.public_tests + question.hidden_tests)


@pytest.mark.parametrize("q", QUESTIONS)
def test_stub_is_otters_blank_prompt(q):
    """The stub keeps the signature and loses every solution line (so it is not the solution)."""
    stubbed = "\n".join(student_stub(s) for s in NB_QUESTIONS[q].solution)
    assert "SOLUTION" not in stubbed and "..." in stubbed
    assert re.search(rf"^(def|class) {QUESTIONS[q][0]}\b", stubbed, re.M)
    assert "alpha / r" not in stubbed and "d_in + d_out" not in stubbed


# --- 1. the reference solution passes ------------------------------------------------------------
@pytest.mark.parametrize("q, seed", SEED_CASES + [pytest.param(q, s, id=f"{q}-seed{s}") for q in QUESTIONS
                                                  for s in (1, 2, 3)])
def test_reference_solution_passes(q, seed):
    QUESTIONS[q][1](reference(q), seed=seed)


@pytest.mark.parametrize("q", QUESTIONS)
def test_notebook_test_cells_pass_with_the_solution_and_fail_with_the_stub(q):
    """The otter test cells themselves (public and hidden), run as otter runs them."""
    question = NB_QUESTIONS[q]
    for test in question.public_tests + question.hidden_tests:
        run_cells(question.solution + [test])
        with pytest.raises(CheckFailed):
            run_cells([student_stub(s) for s in question.solution] + [test])


# --- 2. the blank stub fails, helpfully ----------------------------------------------------------
@pytest.mark.parametrize("q, seed", SEED_CASES)
def test_stub_fails_with_a_helpful_message(q, seed):
    message = rejected(QUESTIONS[q][1], stub(q), seed)
    assert_helpful(message)
    assert re.search(r"not implemented yet|still the blank `\.\.\.`", message), message


@pytest.mark.parametrize("q", QUESTIONS)
def test_missing_answer_fails_with_a_helpful_message(q):
    """The student's name is unbound or None (e.g. the cell was not run): say so, not 'NoneType ...'."""
    message = rejected(QUESTIONS[q][1], None, 0)
    assert_helpful(message)
    assert re.search(r"is None, not a (function|class): define it", message), message


# --- 3. plausible wrong answers are rejected, with feedback that names the mistake ---------------
GENERIC = {
    "q1": r"the answer is not .* How many entries",
    "q2": r"does not equal x W0ᵀ \+ \(alpha/r\)",
    "q3": r"does not return W0 \+ \(alpha/r\)",
    "q4": r"output differs from base\(x\) \+ \(alpha/r\)",
}

WRONG_FUNCTIONS = {
    "q1": [
        ("2rd_in-square-only", lambda d_in, d_out, r: 2 * r * d_in, r"2·r·d, which is right only for square"),
        ("2rd_out-square-only", lambda d_in, d_out, r: 2 * r * d_out, r"2·r·d, which is right only for square"),
        ("dense-dW", lambda d_in, d_out, r: d_in * d_out, r"d_in·d_out .* frozen W₀"),
        ("r-d_in-d_out", lambda d_in, d_out, r: r * d_in * d_out, GENERIC["q1"]),
        ("off-by-one", lambda d_in, d_out, r: r * (d_in + d_out) + 1, GENERIC["q1"]),
        ("counts-a-bias", lambda d_in, d_out, r: r * (d_in + d_out) + d_out, GENERIC["q1"]),
        ("forgets-r", lambda d_in, d_out, r: d_in + d_out, GENERIC["q1"]),
        ("r-squared", lambda d_in, d_out, r: r * r + r * (d_in + d_out), GENERIC["q1"]),
    ],
    "q2": [
        ("scaled-by-alpha", lambda x, W0, A, B, alpha, r: x @ W0.T + alpha * (x @ A.T @ B.T),
         r"scaled BAx by alpha; LoRA scales it by alpha / r"),
        ("no-scaling", lambda x, W0, A, B, alpha, r: x @ W0.T + x @ A.T @ B.T, r"missing its scaling"),
        ("r-over-alpha", lambda x, W0, A, B, alpha, r: x @ W0.T + (r / alpha) * (x @ A.T @ B.T),
         r"scaled by r / alpha"),
        ("rslora-sqrt-r", lambda x, W0, A, B, alpha, r: x @ W0.T + alpha / math.sqrt(r) * (x @ A.T @ B.T),
         GENERIC["q2"]),
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
        ("r-over-alpha", lambda W0, A, B, alpha, r: W0 + (r / alpha) * (B @ A), GENERIC["q3"]),
        ("A-at-B", lambda W0, A, B, alpha, r: W0 + (alpha / r) * (A @ B), r"merge_weight raised RuntimeError"),
        ("transposed-update", lambda W0, A, B, alpha, r: W0.T + (alpha / r) * (A.T @ B.T), r"tensor of W0's shape"),
        ("update-only", lambda W0, A, B, alpha, r: (alpha / r) * (B @ A), GENERIC["q3"]),
        ("in-place-add_", lambda W0, A, B, alpha, r: W0.add_((alpha / r) * (B @ A)), r"changed W0 in place"),
    ],
}


def merge_in_place_iadd(W0, A, B, alpha, r):
    W0 += (alpha / r) * (B @ A)
    return W0


WRONG_FUNCTIONS["q3"].append(("in-place-+=", merge_in_place_iadd, r"changed W0 in place"))


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


WRONG_CLASSES = [
    ("B-random-init", q4_wrong("BRandom", make_factors=_random_B), r"B starts random; .* B must be zeros"),
    ("A-zero-init", q4_wrong("AZero", make_factors=_zero_A), r"A starts at zero too"),
    ("base-not-frozen", q4_wrong("NotFrozen", freeze=lambda self, base: base),
     r"Exactly A and B should require grad; trainable now: \['A', 'B', 'base.bias', 'base.weight'\]"
     r".*Freeze the base layer"),
    ("scaled-by-alpha", q4_wrong("AlphaScale", scale=lambda self, alpha, r: alpha), r"scales B A x by alpha"),
    ("no-scaling", q4_wrong("NoScale", scale=lambda self, alpha, r: 1.0), r"missing the scaling alpha / r"),
    ("rslora-sqrt-r", q4_wrong("SqrtScale", scale=lambda self, alpha, r: alpha / math.sqrt(r)), GENERIC["q4"]),
    ("A-B-swapped-shapes",
     q4_wrong("Swapped", make_factors=_swapped_shapes, update=lambda self, x: self.scaling * (x @ self.A @ self.B)),
     r"Expected A of shape \(r, d_in\)"),
    ("forward-without-base", q4_wrong("NoBase", forward=lambda self, x: self.update(x)),
     r"At initialisation .* must return exactly what the frozen base layer returns"),
    ("forward-forgets-bias", q4_wrong("NoBias", forward=lambda self, x: x @ self.base.weight.T + self.update(x)),
     r"At initialisation .* must return exactly what the frozen base layer returns"),
    ("A-detached", q4_wrong("DetachA", update=lambda self, x: self.scaling * (x @ self.A.detach().T @ self.B.T)),
     r"gradient reaching A differs .* without \.detach\(\)"),
    ("B-detached", q4_wrong("DetachB", update=lambda self, x: self.scaling * (x @ self.A.T @ self.B.detach().T)),
     r"gradient reaching B differs .* without \.detach\(\)"),
    ("nn-Linear-submodules",
     q4_wrong("LinearAB", make_factors=_linear_submodules, update=lambda self, x: self.scaling * self.B(self.A(x))),
     r"`self.A` is a Linear, not an nn.Parameter"),
    ("plain-tensors-not-Parameters", q4_wrong("PlainTensors", make_factors=_plain_tensors),
     r"`self.A` is a Tensor, not an nn.Parameter"),
    ("not-an-nn-Module", NotAModule, r"should be an nn.Module"),
]

WRONG_CASES = [pytest.param(q, answer, pattern, id=f"{q}-{name}")
               for q, answers in WRONG_FUNCTIONS.items() for name, answer, pattern in answers]
WRONG_CASES += [pytest.param("q4", cls, pattern, id=f"q4-{name}") for name, cls, pattern in WRONG_CLASSES]


def test_every_question_has_several_wrong_answers():
    per_question = {q: sum(case.values[0] == q for case in WRONG_CASES) for q in QUESTIONS}
    assert min(per_question.values()) >= 4, per_question


def test_the_independent_q4_answer_is_correct():
    """GoodLoRA, the base of the q4 wrong answers, passes: each wrong answer fails for its one change."""
    for seed in seeds("q4"):
        checks.check_lora_module(GoodLoRA, seed=seed)


@pytest.mark.parametrize("q, answer, pattern", WRONG_CASES)
def test_wrong_answer_is_rejected_with_feedback_that_names_it(q, answer, pattern):
    for seed in seeds(q):  # rejected by the public test already, and by every hidden one
        message = rejected(QUESTIONS[q][1], answer, seed)
        assert_helpful(message)
        assert re.search(pattern, message, re.S), f"seed {seed}: {message}"


# --- 4. the hidden seeds draw other inputs: an answer fitted to the public test fails ------------
def _record(fn, calls):
    def recording(*args):
        result = fn(*args)
        calls.append((args, result))
        return result
    return recording


def test_q1_lookup_table_of_the_public_inputs_fails_the_hidden_test():
    calls = []
    checks.check_lora_param_count(_record(reference("q1"), calls), seed=0)
    table = {args: result for args, result in calls}
    public_inputs = set(table)

    def fitted(d_in, d_out, r):
        return table.get((d_in, d_out, r), 0)

    checks.check_lora_param_count(fitted, seed=0)  # fools the public test ...
    for seed in NB_QUESTIONS["q1"].hidden_seeds:     # ... but not the hidden ones
        hidden_calls = []
        checks.check_lora_param_count(_record(reference("q1"), hidden_calls), seed=seed)
        assert {args for args, _ in hidden_calls} - public_inputs, "the hidden test adds no new shapes"
        assert_helpful(rejected(checks.check_lora_param_count, fitted, seed))


@pytest.mark.parametrize("q", ["q2", "q3"])
def test_memorised_public_output_fails_the_hidden_test(q):
    calls = []
    QUESTIONS[q][1](_record(reference(q), calls), seed=0)
    memorised = calls[0][1].clone()

    def fitted(*args):
        return memorised.clone()

    QUESTIONS[q][1](fitted, seed=0)  # fools the public test ...
    for seed in NB_QUESTIONS[q].hidden_seeds:  # ... but not the hidden ones
        assert_helpful(rejected(QUESTIONS[q][1], fitted, seed))


def test_q4_hidden_seed_builds_another_layer_and_input():
    """A module that replays the outputs it gave in the public test fails the hidden one."""
    outputs = []

    class Recording(GoodLoRA):
        def forward(self, x):
            out = super().forward(x)
            outputs.append(out.detach().clone())
            return out

    checks.check_lora_module(Recording, seed=0)
    public_outputs = list(outputs)

    class Replaying(GoodLoRA):
        calls = 0

        def forward(self, x):
            out = super().forward(x)
            out = out + (public_outputs[Replaying.calls] - out).detach()  # the public values, true gradients
            Replaying.calls += 1
            return out

    checks.check_lora_module(Replaying, seed=0)  # fools the public test ...
    for seed in NB_QUESTIONS["q4"].hidden_seeds:   # ... but not the hidden ones
        Replaying.calls = 0
        assert_helpful(rejected(checks.check_lora_module, Replaying, seed))


# --- 5. robustness: crashing and chatty answers ---------------------------------------------------
class Boom(Exception):
    pass


def _crash(*args):
    raise Boom("something inside went wrong")


class CrashingInit(nn.Module):
    def __init__(self, base, r, alpha):
        raise KeyError("alpha")


class CrashingForward(GoodLoRA):
    def forward(self, x):
        raise ValueError("bad shape")


class ForgotSuperInit(nn.Module):
    def __init__(self, base, r, alpha):
        self.A = nn.Parameter(torch.zeros(r, base.in_features))


CRASHES = [pytest.param(q, _crash, r"raised Boom: something inside went wrong", id=f"{q}-crashes")
           for q in ("q1", "q2", "q3")] + [
    pytest.param("q4", CrashingInit, r"CrashingInit\(base, r, alpha\) raised KeyError: 'alpha'",
                 id="q4-init-crashes"),
    pytest.param("q4", CrashingForward, r"your forward raised ValueError: bad shape", id="q4-forward-crashes"),
    pytest.param("q4", ForgotSuperInit, r"raised AttributeError: cannot assign parameters before Module.__init__",
                 id="q4-forgot-super-init"),
    pytest.param("q4", q4_wrong("StubForward", forward=lambda self, x: None),
                 r"your forward returned None: it is not implemented yet", id="q4-forward-still-blank"),
]


@pytest.mark.parametrize("q, answer, pattern", CRASHES)
def test_crashing_answer_gives_checkfailed_naming_the_exception(q, answer, pattern):
    message = rejected(QUESTIONS[q][1], answer, 0)
    assert_helpful(message)
    assert re.search(pattern, message), message


def _chatty(fn):
    def chatty(*args):
        for _ in range(2000):
            print("debugging my answer " * 10)
        return fn(*args)
    return chatty


@pytest.mark.parametrize("q", QUESTIONS)
def test_answer_that_prints_a_lot_still_passes(q, capsys):
    answer = reference(q)
    if q == "q4":
        solution = answer

        class Chatty(solution):
            def forward(self, x):
                return _chatty(super().forward)(x)

        answer = Chatty
    else:
        answer = _chatty(answer)
    for seed in seeds(q):
        QUESTIONS[q][1](answer, seed=seed)
    assert capsys.readouterr().out.count("debugging my answer") > 10_000
