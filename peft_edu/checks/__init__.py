"""Checks behind the graded exercises: compare a learner's answer with the reference on fresh inputs.

Each exercise is checked in three steps, kept apart so that grading can run the learner's code in a
sandbox and judge it outside (see ``peft_edu.grading``):

1. ``request(seed)``: the inputs, drawn from ``seed`` (tensors and numbers only);
2. ``probe(answer, request)``: runs the learner's code on them and records what happened (values,
   shapes, exceptions), never judging;
3. ``judge(request, observations)``: compares the observations with the reference and raises
   ``CheckFailed`` with feedback the learner can act on. Where a common mistake has a recognisable
   signature (α instead of α/r, B initialised randomly, ...), the message names it.

``core.py`` holds what every exercise shares (``CheckFailed``, ``Exercise``, the probing and judging
helpers); each chapter has its module (``lora.py``, ``lora_beyond_linear.py``, ``dora.py``, ``adapters.py``, ``prompt_methods.py``, ``memory.py``,
``qlora.py``, ``many_tasks.py``, ``choosing.py``) that writes the three steps of its exercises and binds each exercise once, as
``check_lora_forward = Exercise(...)``. That variable is the exercise's name: ``EXERCISES`` is
gathered from the chapter modules, and every exercise is importable from here,
``from peft_edu.checks import check_lora_forward``.

``check_lora_forward(lora_forward, seed=0)`` and its siblings do all three steps in one process: that
is what the notebooks' otter tests call. ``tests/test_checks.py`` proves, chapter by chapter, that
every check rejects the blank stub and plausible wrong answers (listed in ``tests/check_cases.py``).
A hidden test uses another ``seed``, so an answer cannot be fitted to the public test's inputs.
"""

from __future__ import annotations

from . import adapters, choosing, dora, lora, lora_beyond_linear, many_tasks, memory, prompt_methods, qlora
from .core import CheckFailed, Exercise, exercises_in

# chapter (the notebook's name) -> the module of its checks, in the book's order
CHAPTERS = {"lora": lora, "lora_beyond_linear": lora_beyond_linear, "dora": dora, "adapters": adapters, "prompt_methods": prompt_methods,
            "memory": memory, "qlora": qlora, "many_tasks": many_tasks, "choosing": choosing}


def _gather() -> dict[str, Exercise]:
    exercises: dict[str, Exercise] = {}
    for chapter, module in CHAPTERS.items():
        for name, exercise in exercises_in(module).items():
            if name in exercises:
                raise ValueError(f"Two chapters define the exercise {name}; the second is {chapter}'s.")
            exercises[name] = exercise
    return exercises


# The names the notebooks' tests call; grading finds each exercise by the same name.
EXERCISES: dict[str, Exercise] = _gather()
globals().update(EXERCISES)  # from peft_edu.checks import check_lora_forward

__all__ = ["CHAPTERS", "EXERCISES", "CheckFailed", "Exercise", *EXERCISES]
