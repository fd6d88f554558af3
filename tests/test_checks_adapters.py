"""The adapters chapter's exercise checks accept the notebook's solution and reject the stub and wrong answers.

As in ``tests/test_checks.py``: the solutions and the hidden seeds are read from the otter master notebook
(``notebooks/adapters.ipynb``) and the stub is made by otter's own ``replace_solutions``, so these tests see
what students get. Each wrong answer comes with a pattern its feedback must match.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from peft_edu import checks
from peft_edu.checks import CheckFailed

from notebook_helpers import assert_helpful, read_questions, rejected, run_cells, student_stub

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "adapters.ipynb"
NB_QUESTIONS = read_questions(NOTEBOOK)
QUESTIONS = {
    "q1": ("bottleneck_params", checks.check_bottleneck_params),
    "q2": ("adapter_forward", checks.check_adapter_forward),
    "q3": ("ia3_scale_ffn", checks.check_ia3_scale_ffn),
}


def reference(q):
    return run_cells(NB_QUESTIONS[q].solution)[QUESTIONS[q][0]]


def stub(q):
    return run_cells([student_stub(s) for s in NB_QUESTIONS[q].solution])[QUESTIONS[q][0]]


def seeds(q):
    return [0] + NB_QUESTIONS[q].hidden_seeds


SEED_CASES = [pytest.param(q, s, id=f"{q}-seed{s}") for q in QUESTIONS for s in seeds(q)]


def test_notebook_has_the_questions_with_solutions_and_tests():
    assert set(NB_QUESTIONS) == set(QUESTIONS)
    for q, question in NB_QUESTIONS.items():
        assert question.solution and question.public_tests and question.hidden_tests
        assert question.hidden_seeds and 0 not in question.hidden_seeds
        assert all(QUESTIONS[q][1].__name__ in t for t in question.public_tests + question.hidden_tests)
        assert QUESTIONS[q][1].__name__ in checks.EXERCISES


@pytest.mark.parametrize("q, seed", SEED_CASES + [pytest.param(q, s, id=f"{q}-seed{s}") for q in QUESTIONS
                                                  for s in (1, 2, 3)])
def test_reference_solution_passes(q, seed):
    QUESTIONS[q][1](reference(q), seed=seed)


@pytest.mark.parametrize("q", QUESTIONS)
def test_notebook_test_cells_pass_with_the_solution_and_fail_with_the_stub(q):
    question = NB_QUESTIONS[q]
    for test in question.public_tests + question.hidden_tests:
        run_cells(question.solution + [test])
        with pytest.raises(CheckFailed):
            run_cells([student_stub(s) for s in question.solution] + [test])


@pytest.mark.parametrize("q", QUESTIONS)
def test_stub_is_otters_blank_prompt(q):
    stubbed = "\n".join(student_stub(s) for s in NB_QUESTIONS[q].solution)
    assert "SOLUTION" not in stubbed and "..." in stubbed
    assert re.search(rf"^def {QUESTIONS[q][0]}\b", stubbed, re.M)
    assert "relu" not in stubbed and "W_up.T" not in stubbed and "2 * d * m" not in stubbed


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


def _m(d, f):
    return d // f


WRONG = {
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
        ("no-residual", lambda h, Wd, bd, Wu, bu: torch.relu(h @ Wd.T + bd) @ Wu.T + bu, r"residual \(skip\) connection"),
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
        ("W-not-transposed", lambda x, W, b, l: (x * l) @ W + b, r"does not equal W \(l ⊙ x\) \+ b|raised RuntimeError"),
    ],
}
WRONG_CASES = [pytest.param(q, fn, pattern, id=f"{q}-{name}") for q, answers in WRONG.items()
               for name, fn, pattern in answers]


def test_every_question_has_several_wrong_answers():
    assert all(len(WRONG[q]) >= 2 for q in QUESTIONS)


@pytest.mark.parametrize("q, answer, pattern", WRONG_CASES)
def test_wrong_answer_is_rejected_with_feedback_that_names_it(q, answer, pattern):
    for seed in seeds(q):
        message = rejected(QUESTIONS[q][1], answer, seed)
        assert_helpful(message)
        assert re.search(pattern, message), message


def test_q3_output_scaling_on_the_ffn_shape_is_named_even_when_it_crashes():
    """On the real FFN shape (d_in ≠ d_out) scaling the output cannot run; the message still says why."""
    request = checks.IA3_SCALE_FFN.request(0)
    request["cases"] = request["cases"][1:]
    observed = checks.IA3_SCALE_FFN.probe(lambda x, W, b, l: (x @ W.T + b) * l, request)
    with pytest.raises(CheckFailed, match=r"scales the layer's \*input\*"):
        checks.IA3_SCALE_FFN.judge(request, observed)


@pytest.mark.parametrize("q", QUESTIONS)
def test_memorised_public_answer_fails_the_hidden_test(q):
    """An answer that replays the public test's values (a lookup table) fails with the hidden seed."""
    exercise = checks.EXERCISES[QUESTIONS[q][1].__name__]
    public = exercise.request(0)
    solution = reference(q)
    if q == "q1":
        table = {tuple(case): solution(*case) for case in public["cases"]}
        memorised = lambda d, f: table.get((d, f), 0)  # noqa: E731
    elif q == "q2":
        keys = ("h", "W_down", "b_down", "W_up", "b_up")
        saved = solution(*(public[k] for k in keys))
        memorised = lambda *args: saved  # noqa: E731
    else:
        saved = [solution(*(c[k] for k in ("x", "W", "b", "l"))) for c in public["cases"]]
        memorised = lambda x, W, b, l: next(s for s in saved if s.shape[-1] == W.shape[0])  # noqa: E731
    QUESTIONS[q][1](memorised, seed=0)
    for seed in NB_QUESTIONS[q].hidden_seeds:
        rejected(QUESTIONS[q][1], memorised, seed)
