"""The DoRA chapter's exercise checks accept the reference and reject the stub and wrong answers.

As ``tests/test_checks.py`` does for the LoRA chapter: the reference solutions and the student stubs
are read from the otter master notebook (``notebooks/dora.ipynb``), the stub made by otter-grader's
own ``replace_solutions``, and the hidden tests' seeds taken from the notebook's ``# HIDDEN`` cells.
Each wrong answer comes with a pattern its feedback must match.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from peft_edu import checks

from notebook_helpers import assert_helpful, read_questions, rejected, run_cells, student_stub

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dora.ipynb"
NB_QUESTIONS = read_questions(NOTEBOOK)

QUESTIONS = {
    "q1": ("weight_norm", checks.check_weight_norm),
    "q2": ("dora_weight", checks.check_dora_weight),
    "q3": ("dora_forward", checks.check_dora_forward),
}


def reference(q: str):
    return run_cells(NB_QUESTIONS[q].solution)[QUESTIONS[q][0]]


def stub(q: str):
    return run_cells([student_stub(s) for s in NB_QUESTIONS[q].solution])[QUESTIONS[q][0]]


def seeds(q: str) -> list[int]:
    return [0] + NB_QUESTIONS[q].hidden_seeds


SEED_CASES = [pytest.param(q, seed, id=f"{q}-seed{seed}") for q in QUESTIONS for seed in seeds(q)]


def test_notebook_has_the_three_questions_with_solutions_and_tests():
    assert set(NB_QUESTIONS) == set(QUESTIONS)
    for q, question in NB_QUESTIONS.items():
        assert question.solution and question.public_tests and question.hidden_tests
        assert question.hidden_seeds and 0 not in question.hidden_seeds
        assert all(QUESTIONS[q][1].__name__ in test for test in question.public_tests + question.hidden_tests)
        assert QUESTIONS[q][1].__name__ in checks.EXERCISES


@pytest.mark.parametrize("q", QUESTIONS)
def test_stub_is_otters_blank_prompt(q):
    stubbed = "\n".join(student_stub(s) for s in NB_QUESTIONS[q].solution)
    assert "SOLUTION" not in stubbed and "..." in stubbed
    assert re.search(rf"^def {QUESTIONS[q][0]}\b", stubbed, re.M)
    assert "vector_norm" not in stubbed and "alpha / r" not in stubbed


# --- 1. the reference solution passes ------------------------------------------------------------
@pytest.mark.parametrize("q, seed", SEED_CASES + [pytest.param(q, s, id=f"{q}-seed{s}") for q in QUESTIONS
                                                  for s in (1, 2, 3)])
def test_reference_solution_passes(q, seed):
    QUESTIONS[q][1](reference(q), seed=seed)


@pytest.mark.parametrize("q", QUESTIONS)
def test_notebook_test_cells_pass_with_the_solution_and_fail_with_the_stub(q):
    question = NB_QUESTIONS[q]
    for test in question.public_tests + question.hidden_tests:
        run_cells(question.solution + [test])
        with pytest.raises(checks.CheckFailed):
            run_cells([student_stub(s) for s in question.solution] + [test])


def test_the_reference_matches_peft_edus_dora_layer():
    """The notebook's dora_weight is what DoraLinear merges to, and dora_forward what it computes."""
    from torch import nn
    from peft_edu.dora import DoraLinear

    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(10, 6, bias=False).requires_grad_(False), r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(1.5)
    W0, A, B, m = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A.weight,
                                                  layer.lora_B.weight, layer.lora_magnitude_vector))
    x = torch.randn(3, 10)
    torch.testing.assert_close(reference("q1")(W0), layer.base_layer.weight.norm(dim=1))
    torch.testing.assert_close(x @ reference("q2")(W0, A, B, m, 4, 2).T, layer(x).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference("q3")(x, W0, A, B, m, 4, 2), layer(x).detach(), atol=1e-5, rtol=1e-5)


# --- 2. the blank stub fails, helpfully ----------------------------------------------------------
@pytest.mark.parametrize("q, seed", SEED_CASES)
def test_stub_fails_with_a_helpful_message(q, seed):
    message = rejected(QUESTIONS[q][1], stub(q), seed)
    assert_helpful(message)
    assert "not implemented yet" in message, message


@pytest.mark.parametrize("q", QUESTIONS)
def test_missing_answer_fails_with_a_helpful_message(q):
    message = rejected(QUESTIONS[q][1], None, 0)
    assert_helpful(message)
    assert re.search(r"is None, not a function: define it", message), message


# --- 3. plausible wrong answers are rejected, with feedback that names the mistake ---------------
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


WRONG = {
    "q1": [
        ("wrong-axis-dim0", lambda W: torch.linalg.vector_norm(W, dim=0), r"wrong axis: one number per input feature"),
        ("frobenius", lambda W: torch.linalg.vector_norm(W), r"norm of the whole matrix"),
        ("keepdim", lambda W: torch.linalg.vector_norm(W, dim=1, keepdim=True), r"Right values, but shape \(d_out, 1\)"),
        ("squared", lambda W: (W ** 2).sum(dim=1), r"squared norms"),
        ("L1", lambda W: W.abs().sum(dim=1), r"does not equal the L2 norm of each row"),
        ("max-abs", lambda W: W.abs().amax(dim=1), r"does not equal the L2 norm of each row"),
        ("list", lambda W: torch.linalg.vector_norm(W, dim=1).tolist(), r"should return a tensor, it returned list"),
    ],
    "q2": [
        ("wrong-axis", lambda W0, A, B, m, alpha, r: m[:, None] * _V(W0, A, B, alpha, r) / _cols(_V(W0, A, B, alpha, r)),
         r"normalised over the wrong axis"),
        ("no-scaling", lambda W0, A, B, m, alpha, r: m[:, None] * (W0 + B @ A) / _rows(W0 + B @ A),
         r"missing its scaling alpha / r"),
        ("scaled-by-alpha", lambda W0, A, B, m, alpha, r: m[:, None] * (W0 + alpha * B @ A) / _rows(W0 + alpha * B @ A),
         r"scaled BA by alpha"),
        ("norm-of-W0", lambda W0, A, B, m, alpha, r: m[:, None] * _V(W0, A, B, alpha, r) / _rows(W0),
         r"divided by the norm of W0"),
        ("no-magnitude", lambda W0, A, B, m, alpha, r: _V(W0, A, B, alpha, r) / _rows(_V(W0, A, B, alpha, r)),
         r"direction V/‖V‖ only"),
        ("not-normalised", lambda W0, A, B, m, alpha, r: m[:, None] * _V(W0, A, B, alpha, r), r"did not normalise V"),
        ("plain-lora", lambda W0, A, B, m, alpha, r: _V(W0, A, B, alpha, r), r"returned the LoRA weight"),
        ("m-over-columns", lambda W0, A, B, m, alpha, r: _V(W0, A, B, alpha, r) / _rows(_V(W0, A, B, alpha, r)) * m,
         r"dora_weight raised RuntimeError"),
        ("in-place", _in_place, r"changed W0 in place"),
    ],
    "q3": [
        ("norm-not-detached", _forward_through_norm, r"gradient flows through ‖V‖.*Detach it"),
        ("wrong-axis", lambda x, W0, A, B, m, alpha, r: x @ (m[:, None] * _V(W0, A, B, alpha, r)
                                                              / _cols(_V(W0, A, B, alpha, r)).detach()).T,
         r"normalised over the wrong axis"),
        ("no-scaling", lambda x, W0, A, B, m, alpha, r: x @ (m[:, None] * (W0 + B @ A) / _rows(W0 + B @ A).detach()).T,
         r"missing its scaling alpha / r"),
        ("plain-lora", lambda x, W0, A, B, m, alpha, r: x @ _V(W0, A, B, alpha, r).T, r"plain LoRA"),
        ("no-magnitude", lambda x, W0, A, B, m, alpha, r: x @ (_V(W0, A, B, alpha, r) / _rows(_V(W0, A, B, alpha, r))).T,
         r"magnitude m is missing"),
        ("W0-not-transposed", lambda x, W0, A, B, m, alpha, r: x @ (m[:, None] * _V(W0, A, B, alpha, r)
                                                                     / _rows(_V(W0, A, B, alpha, r)).detach()),
         r"dora_forward raised RuntimeError"),
        ("A-detached", _forward_detaches_A, r"No gradient reaches A: .*no \.detach\(\)"),
        ("under-no-grad", _forward_no_grad, r"No gradient reaches A, B, m"),
    ],
}
WRONG_CASES = [pytest.param(q, answer, pattern, id=f"{q}-{name}")
               for q, answers in WRONG.items() for name, answer, pattern in answers]


def test_every_question_has_several_wrong_answers():
    assert all(len(answers) >= 4 for answers in WRONG.values())


@pytest.mark.parametrize("q, answer, pattern", WRONG_CASES)
def test_wrong_answer_is_rejected_with_feedback_that_names_it(q, answer, pattern):
    for seed in seeds(q):
        message = rejected(QUESTIONS[q][1], answer, seed)
        assert_helpful(message)
        assert re.search(pattern, message, re.S), f"seed {seed}: {message}"


# --- 4. the hidden seeds draw other inputs: an answer fitted to the public test fails ------------
def _record(fn, calls):
    def recording(*args):
        result = fn(*args)
        calls.append(result)
        return result
    return recording


@pytest.mark.parametrize("q", ["q1", "q2"])
def test_memorised_public_output_fails_the_hidden_test(q):
    calls = []
    QUESTIONS[q][1](_record(reference(q), calls), seed=0)
    memorised = calls[0].detach().clone()

    def fitted(*args):
        return memorised.clone()

    QUESTIONS[q][1](fitted, seed=0)  # fools the public test ...
    for seed in NB_QUESTIONS[q].hidden_seeds:  # ... but not the hidden ones
        assert_helpful(rejected(QUESTIONS[q][1], fitted, seed))


def test_q3_memorised_output_with_true_gradients_fails_the_hidden_test():
    calls = []
    checks.check_dora_forward(_record(reference("q3"), calls), seed=0)
    memorised = calls[0].detach().clone()

    def fitted(*args):
        out = reference("q3")(*args)
        return out + (memorised - out).detach() if out.shape == memorised.shape else memorised.clone()

    checks.check_dora_forward(fitted, seed=0)  # the public values, true gradients: fools the public test ...
    for seed in NB_QUESTIONS["q3"].hidden_seeds:  # ... but not the hidden ones
        assert_helpful(rejected(checks.check_dora_forward, fitted, seed))


@pytest.mark.parametrize("q", QUESTIONS)
def test_crashing_answer_gives_checkfailed_naming_the_exception(q):
    def crash(*args):
        raise KeyError("oops")
    message = rejected(QUESTIONS[q][1], crash, 0)
    assert_helpful(message)
    assert "raised KeyError: 'oops'" in message, message
