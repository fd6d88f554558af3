"""Local grading (`make grade`): every hostile submission scores what its real answers earn.

Submissions are built from the LoRA master notebook the way a student's looks (tests/grading_helpers.py):
solutions replaced by answers (right or wrong), test cells replaced by `grader.check` calls, plus hostile cells.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grading_helpers
import nbformat
from grading_helpers import needs_bwrap

from peft_edu.grading import questions_of

ROOT = Path(__file__).resolve().parents[1]
MASTER = ROOT / "notebooks" / "lora.ipynb"
FULL = {"q1": 1.0, "q2": 2.0, "q3": 1.0, "q4": 2.0, "q5": 2.0}

RIGHT = {
    "q1": "def lora_param_count(d_in, d_out, r):\n    return r * (d_in + d_out)",
    "q2": "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ W0.T + (alpha / r) * (x @ A.T @ B.T)",
    "q3": "def merge_weight(W0, A, B, alpha, r):\n    return W0 + (alpha / r) * (B @ A)",
    "q4": ("import math\nfrom torch import nn\n\nclass MyLoRALinear(nn.Module):\n"
           "    def __init__(self, base, r, alpha):\n        super().__init__()\n"
           "        self.base = base.requires_grad_(False)\n        d_out, d_in = base.weight.shape\n"
           "        self.A = nn.Parameter(torch.empty(r, d_in))\n        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))\n"
           "        self.B = nn.Parameter(torch.zeros(d_out, r))\n        self.scaling = alpha / r\n\n"
           "    def forward(self, x):\n        return self.base(x) + self.scaling * (x @ self.A.T @ self.B.T)"),
    "q5": ("def delta_weight_after_step(x, grad_h, A, B, alpha, r, lr):\n    s = alpha / r\n"
           "    grad_A, grad_B = s * B.T @ grad_h.T @ x, s * grad_h.T @ (x @ A.T)\n"
           "    return s * (B - lr * grad_B) @ (A - lr * grad_A)"),
}
WRONG_FORWARD = "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ W0.T + alpha * (x @ A.T @ B.T)"

pytestmark = needs_bwrap


def submission(answers: dict[str, str], before: list[str] = (), after: list[str] = ()):
    return grading_helpers.submission(MASTER, answers, before, after)


def grade(tmp_path: Path, notebooks: dict, **limits) -> dict[str, dict[str, float]]:
    return grading_helpers.grade(tmp_path, MASTER, notebooks, **limits)


def test_questions_come_from_the_master_notebook():
    questions = questions_of(MASTER)
    assert [(q.name, q.points, q.answer) for q in questions] == [
        ("q1", 1.0, "lora_param_count"), ("q2", 2.0, "lora_forward"), ("q3", 1.0, "merge_weight"), ("q4", 2.0, "MyLoRALinear"),
        ("q5", 2.0, "delta_weight_after_step")]


def test_right_blank_wrong_and_corrupt_submissions(tmp_path):
    scores = grade(tmp_path, {
        "right": submission(RIGHT),
        "blank": submission({}),
        "wrong_forward": submission(RIGHT | {"q2": WRONG_FORWARD}),
        "corrupt": '{"cells": [ this is not json',
    })
    assert scores["right"] == FULL
    assert scores["blank"] == dict.fromkeys(FULL, 0.0)
    assert scores["wrong_forward"] == FULL | {"q2": 0.0}
    assert scores["corrupt"] == dict.fromkeys(FULL, 0.0)
    feedback = (tmp_path / "out" / "feedback")
    assert "scaled BAx by alpha" in (feedback / "wrong_forward.md").read_text()
    assert "could not be read as a notebook" in (feedback / "corrupt.md").read_text()


def test_raising_looping_and_chatty_cells_do_not_cost_the_answers_their_points(tmp_path):
    scores = grade(tmp_path, {
        "raises": submission(RIGHT, before=["raise RuntimeError('my experiment broke')"]),
        "loops": submission(RIGHT, before=["while True:\n    pass"]),
        "chatty": submission(RIGHT, before=["for _ in range(200):\n    print('x' * 100_000)"]),
        "loops_in_answer": submission(RIGHT | {"q1": "def lora_param_count(d_in, d_out, r):\n    while True:\n        pass"}),
    }, cell_timeout_s=3)
    assert scores["raises"] == FULL
    assert scores["loops"] == FULL
    assert scores["chatty"] == FULL
    assert scores["loops_in_answer"] == FULL | {"q1": 0.0}
    log = (tmp_path / "out" / "feedback" / "chatty.md").read_text()
    assert len(log) < 10_000  # the feedback keeps the end of the output, not megabytes


def test_a_loop_that_swallows_the_alarm_hits_the_notebook_time_limit_and_grading_goes_on(tmp_path):
    stubborn = "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n    except BaseException:\n        pass"
    scores = grade(tmp_path, {"a_stubborn": submission(RIGHT, before=[stubborn]), "b_right": submission(RIGHT)},
                   timeout_s=20, cell_timeout_s=2)
    assert scores["a_stubborn"] == dict.fromkeys(FULL, 0.0)
    assert scores["b_right"] == FULL
    assert "time limit" in (tmp_path / "out" / "feedback" / "a_stubborn.md").read_text()


def test_a_submission_cannot_touch_tests_gradebook_or_other_files(tmp_path):
    checks_file = ROOT / "peft_edu" / "checks" / "lora.py"
    checks_before = checks_file.read_bytes()
    out = tmp_path / "out"
    vandal = f"""
import os, shutil, pathlib
for target in [{str(checks_file)!r}, {str(out / 'gradebook.csv')!r}]:
    try:
        pathlib.Path(target).write_text("assert True  # all tests pass")
    except OSError as error:
        print("blocked:", error)
for folder in [{str(ROOT / 'tests')!r}, {str(tmp_path / 'submissions')!r}, os.path.expanduser("~")]:
    shutil.rmtree(folder, ignore_errors=True)
"""
    scores = grade(tmp_path, {"vandal": submission(RIGHT | {"q2": WRONG_FORWARD}, before=[vandal])})
    assert scores["vandal"] == FULL | {"q2": 0.0}
    assert checks_file.read_bytes() == checks_before
    assert (ROOT / "tests" / "test_grading.py").exists()
    assert not (out / "gradebook.csv").read_text().startswith("assert True")


PATCH_THE_CHECKS = """
import peft_edu.checks as checks
for exercise in checks.EXERCISES.values():
    object.__setattr__(exercise, "judge", lambda request, observed: None)
checks.check_lora_forward = lambda *args, **kwargs: None
"""
FORGE_OBSERVATIONS = """
import pathlib
pathlib.Path("observations").mkdir(exist_ok=True)
pathlib.Path("observations/q2-hidden.json").write_text('{"callable": true}')
"""


def test_patching_the_checks_or_planting_results_earns_nothing(tmp_path):
    scores = grade(tmp_path, {
        "patcher": submission(RIGHT | {"q2": WRONG_FORWARD}, before=[PATCH_THE_CHECKS]),
        "forger": submission(RIGHT | {"q2": WRONG_FORWARD}, before=[FORGE_OBSERVATIONS]),
    })
    assert scores["patcher"] == FULL | {"q2": 0.0}
    assert scores["forger"] == FULL | {"q2": 0.0}


def test_why_we_do_not_grade_inside_the_submission_otter_run_is_fooled(tmp_path):
    """The same patching notebook gets full marks from `otter run`, whose tests run inside the submission."""
    out = tmp_path / "assign"
    subprocess.run([sys.executable, str(ROOT / "tools" / "assignments.py"), "--no-run-tests", "--out", str(out), "lora"],
                   check=True, capture_output=True)
    student = nbformat.read(out / "lora" / "student" / "lora.ipynb", as_version=4)
    for cell in student.cells:
        if cell.cell_type == "code" and cell.source.startswith("def lora_forward"):
            cell.source = WRONG_FORWARD
        elif cell.cell_type == "code" and cell.source.startswith("# Set-up"):
            cell.source += "\n" + PATCH_THE_CHECKS
    (tmp_path / "patcher.ipynb").write_text(nbformat.writes(student))
    (tmp_path / "results").mkdir()
    subprocess.run([sys.executable, "-m", "otter", "run", "-a", str(out / "lora" / "lora-autograder.zip"),
                    "-o", str(tmp_path / "results"), str(tmp_path / "patcher.ipynb")], check=True, capture_output=True)
    tests = json.loads((tmp_path / "results" / "results.json").read_text())["tests"]
    assert {t["name"]: t["score"] for t in tests if "score" in t}["q2"] == 2.0  # fooled
    assert grade(tmp_path / "ours", {"patcher": submission(RIGHT | {"q2": WRONG_FORWARD}, before=[PATCH_THE_CHECKS])}
                 )["patcher"]["q2"] == 0.0  # not fooled
