"""The prompt-methods chapter's exercise checks accept the reference and reject the stub and wrong answers.

As in ``test_checks.py``: the reference solutions, the hidden seeds and the test cells are read from the
otter master notebook (``notebooks/prompt_methods.ipynb``), and the student stub is produced by
otter-grader's own ``replace_solutions``, so these tests see exactly what students get. Each wrong answer
comes with a pattern its feedback must match: the mistake's own message where the check claims to
recognise it, the generic one where it does not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from notebook_helpers import assert_helpful, read_questions, rejected, run_cells, student_stub

import peft
from peft_edu import virtual_tokens
from peft_edu import checks
from peft_edu.checks import CheckFailed

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "prompt_methods.ipynb"

# question name -> (the name the student defines, the check behind the question's tests)
QUESTIONS = {
    "q1": ("prefix_param_count", checks.check_prefix_param_count),
    "q2": ("extend_attention_mask", checks.check_extend_attention_mask),
    "q3": ("prefix_attention", checks.check_prefix_attention),
    "q4": ("gate_lambda", checks.check_gate_lambda),
}


NB_QUESTIONS = read_questions(NOTEBOOK)


def reference(q: str):
    return run_cells(NB_QUESTIONS[q].solution)[QUESTIONS[q][0]]


def stub(q: str):
    return run_cells([student_stub(s) for s in NB_QUESTIONS[q].solution])[QUESTIONS[q][0]]


def seeds(q: str) -> list[int]:
    return [0] + NB_QUESTIONS[q].hidden_seeds


SEED_CASES = [pytest.param(q, seed, id=f"{q}-seed{seed}") for q in QUESTIONS for seed in seeds(q)]


# --- the notebook itself -------------------------------------------------------------------------
def test_notebook_has_the_questions_with_solutions_and_tests():
    assert set(NB_QUESTIONS) == set(QUESTIONS)
    for q, question in NB_QUESTIONS.items():
        assert question.solution and question.public_tests and question.hidden_tests, q
        assert question.hidden_seeds and 0 not in question.hidden_seeds, f"{q}'s hidden test must use another seed"
        assert all(QUESTIONS[q][1].__name__ in test for test in question.public_tests + question.hidden_tests)


def test_checks_are_registered_for_grading():
    for _, check in QUESTIONS.values():
        assert check.__name__ in checks.EXERCISES


@pytest.mark.parametrize("q", QUESTIONS)
def test_stub_is_otters_blank_prompt(q):
    stubbed = "\n".join(student_stub(s) for s in NB_QUESTIONS[q].solution)
    assert "SOLUTION" not in stubbed and "..." in stubbed
    assert re.search(rf"^def {QUESTIONS[q][0]}\b", stubbed, re.M)
    assert "softmax" not in stubbed and "torch.cat" not in stubbed and "2 * num_layers" not in stubbed


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
        with pytest.raises(CheckFailed):
            run_cells([student_stub(s) for s in question.solution] + [test])


def test_q1_reference_matches_peft_counts():
    """The count the exercise asks for is PEFT's: tiny BERT, with and without the re-parameterisation."""
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=32, max_position_embeddings=32))
    count = reference("q1")
    for kwargs, h in (({}, None), ({"prefix_projection": True, "encoder_hidden_size": 10}, 10)):
        model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=5,
                                                                  **kwargs))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == count(5, 3, 24, h)
        base = model.get_base_model()


def test_q2_and_q3_references_match_peft_edu():
    """The mask is the hook's; prefix_attention is what a real attention head computes with the prefix."""
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    kwargs = {"attention_mask": mask}
    virtual_tokens.extend_attention_mask(kwargs, 2, 2)
    assert torch.equal(reference("q2")(mask, 2), kwargs["attention_mask"])
    torch.manual_seed(0)
    q, K, V, P_K, P_V = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5, 8), torch.randn(3, 8), torch.randn(3, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[None], torch.cat([P_K, K])[None], torch.cat([P_V, V])[None])
    assert torch.allclose(reference("q3")(q, K, V, P_K, P_V), sdpa[0], atol=1e-6)
    lam = reference("q4")(q, K, P_K)[:, None]
    unified = lam * torch.softmax(q @ P_K.T / 8 ** 0.5, -1) @ P_V + (1 - lam) * torch.softmax(q @ K.T / 8 ** 0.5, -1) @ V
    assert torch.allclose(unified, sdpa[0], atol=1e-6)  # the unified view's identity


# --- 2. the blank stub fails, helpfully ----------------------------------------------------------
@pytest.mark.parametrize("q, seed", SEED_CASES)
def test_stub_fails_with_a_helpful_message(q, seed):
    message = rejected(QUESTIONS[q][1], stub(q), seed)
    assert_helpful(message)
    assert re.search(r"not implemented yet", message), message


@pytest.mark.parametrize("q", QUESTIONS)
def test_missing_answer_fails_with_a_helpful_message(q):
    message = rejected(QUESTIONS[q][1], None, 0)
    assert_helpful(message)
    assert re.search(r"is None, not a function: define it", message), message


# --- 3. plausible wrong answers are rejected, with feedback that names the mistake ---------------
GENERIC = {
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


WRONG_FUNCTIONS = {
    "q1": [
        ("forgets-K-and-V", lambda n, L, d, h=None: _ppc(n, L, d, h, two=1), r"factor 2 is missing"),
        ("one-layer-only", lambda n, L, d, h=None: _ppc(n, L, d, h, layers=False), r"one layer's prefix"),
        ("prompt-tuning-count", lambda n, L, d, h=None: n * d, r"prompt tuning's soft prompt"),
        ("mlp-without-biases", lambda n, L, d, h=None: _ppc(n, L, d, h, biases=False), r"biases .* are missing"),
        ("mlp-counts-the-table-too", lambda n, L, d, h=None: _ppc(n, L, d, h, table_too=True),
         r"added the table P"),
        ("mlp-counts-only-the-table", lambda n, L, d, h=None: n * 2 * L * d, r"size of the table P"),
        ("ignores-the-projection", lambda n, L, d, h=None: _ppc(n, L, d, None) + 1, GENERIC["q1"]),
    ],
    "q2": [
        ("appends-ones", lambda m, n: torch.cat([m, m.new_ones(m.shape[0], n)], 1), r"appended the ones"),
        ("prepends-zeros", lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1), r"prepended zeros"),
        ("appends-zeros", lambda m, n: torch.cat([m, m.new_zeros(m.shape[0], n)], 1), r"appended zeros"),
        ("repeats-first-column", lambda m, n: torch.cat([m[:, :1].repeat(1, n), m], 1), r"first column"),
        ("float-mask", lambda m, n: torch.cat([torch.ones(m.shape[0], n), m.float()], 1), r"keep the mask's dtype"),
        ("n-rows-not-columns", lambda m, n: torch.cat([m.new_ones(n, m.shape[1]), m], 0), r"should have shape"),
        ("modifies-in-place", lambda m, n: torch.cat([m.new_ones(m.shape[0], n), m.zero_().add_(1)], 1),
         r"changed the mask in place"),
        ("all-ones", lambda m, n: m.new_ones(m.shape[0], m.shape[1] + n), GENERIC["q2"]),
    ],
    "q3": [
        ("real-keys-only", lambda q, K, V, PK, PV: _softmax_attention(q, K, V), r"ignores the prefix"),
        ("two-softmaxes-summed", lambda q, K, V, PK, PV: _softmax_attention(q, PK, PV) + _softmax_attention(q, K, V),
         r"two separately normalised"),
        ("unscaled", lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([PV, V]), scale=False),
         r"not scaled"),
        ("keys-values-misaligned", lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([V, PV])),
         r"not in the same order"),
        ("softmax-over-queries", lambda q, K, V, PK, PV:
            torch.softmax(q @ torch.cat([PK, K]).T / q.shape[-1] ** 0.5, dim=0) @ torch.cat([PV, V]), r"wrong axis"),
        ("prefix-as-queries", lambda q, K, V, PK, PV: _softmax_attention(torch.cat([PK, q]), torch.cat([PK, K]),
                                                                         torch.cat([PV, V])), r"should have shape"),
        ("P_K-as-values", lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([PK[:, :V.shape[1]], V])),
         GENERIC["q3"]),
    ],
    "q4": [
        ("one-minus-lambda", lambda q, K, PK: 1 - _gate(q, K, PK), r"1 − λ"),
        ("unscaled", lambda q, K, PK: _gate(q, K, PK, scale=False), r"not scaled"),
        ("means-not-sums", lambda q, K, PK: _gate(q, K, PK, reduce="mean"), r"averaged the exponentials"),
        ("counts-keys", lambda q, K, PK: torch.full((q.shape[0],), PK.shape[0] / (PK.shape[0] + K.shape[0])),
         r"not a count of keys"),
        ("keepdim-shape", lambda q, K, PK: _gate(q, K, PK)[:, None], r"Right values, but shape"),
        ("scores-not-exponentials", lambda q, K, PK: (q @ PK.T).sum(-1) / ((q @ PK.T).sum(-1) + (q @ K.T).sum(-1)),
         GENERIC["q4"]),
    ],
}

WRONG_CASES = [pytest.param(q, answer, pattern, id=f"{q}-{name}")
               for q, answers in WRONG_FUNCTIONS.items() for name, answer, pattern in answers]


def test_every_question_has_several_wrong_answers():
    per_question = {q: sum(case.values[0] == q for case in WRONG_CASES) for q in QUESTIONS}
    assert min(per_question.values()) >= 4, per_question


@pytest.mark.parametrize("q, answer, pattern", WRONG_CASES)
def test_wrong_answer_is_rejected_with_feedback_that_names_it(q, answer, pattern):
    for seed in seeds(q):  # rejected by the public test already, and by every hidden one
        message = rejected(QUESTIONS[q][1], answer, seed)
        assert_helpful(message)
        assert re.search(pattern, message, re.S), f"seed {seed}: {message}"


def test_numerically_careful_gate_passes():
    def stable(q, K, P_K):
        s_p, s_k = q @ P_K.T / q.shape[-1] ** 0.5, q @ K.T / q.shape[-1] ** 0.5
        top = torch.maximum(s_p.max(-1).values, s_k.max(-1).values)[:, None]
        a, b = (s_p - top).exp().sum(-1), (s_k - top).exp().sum(-1)
        return a / (a + b)

    for seed in seeds("q4"):
        checks.check_gate_lambda(stable, seed=seed)


# --- 4. the hidden seeds draw other inputs: an answer fitted to the public test fails ------------
def _record(fn, calls):
    def recording(*args):
        result = fn(*args)
        calls.append((args, result))
        return result
    return recording


def test_q1_lookup_table_of_the_public_inputs_fails_the_hidden_test():
    calls = []
    checks.check_prefix_param_count(_record(reference("q1"), calls), seed=0)
    table = {args: result for args, result in calls}

    def fitted(*args):
        return table.get(args, 0)

    checks.check_prefix_param_count(fitted, seed=0)  # fools the public test ...
    for seed in NB_QUESTIONS["q1"].hidden_seeds:       # ... but not the hidden ones
        assert_helpful(rejected(checks.check_prefix_param_count, fitted, seed))


@pytest.mark.parametrize("q", ["q2", "q3", "q4"])
def test_memorised_public_output_fails_the_hidden_test(q):
    calls = []
    QUESTIONS[q][1](_record(reference(q), calls), seed=0)
    memorised = calls[0][1].clone()

    def fitted(*args):
        return memorised.clone()

    QUESTIONS[q][1](fitted, seed=0)  # fools the public test ...
    for seed in NB_QUESTIONS[q].hidden_seeds:  # ... but not the hidden ones
        assert_helpful(rejected(QUESTIONS[q][1], fitted, seed))


# --- 5. robustness: crashing answers --------------------------------------------------------------
class Boom(Exception):
    pass


def _crash(*args):
    raise Boom("something inside went wrong")


@pytest.mark.parametrize("q", QUESTIONS)
def test_crashing_answer_gives_checkfailed_naming_the_exception(q):
    message = rejected(QUESTIONS[q][1], _crash, 0)
    assert_helpful(message)
    assert re.search(r"raised Boom: something inside went wrong", message), message
