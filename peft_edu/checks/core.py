"""The machinery behind every exercise check, written once: failing, probing, judging, and ``Exercise``.

A chapter module (``lora.py``, ``dora.py``, ...) writes, for each exercise, a ``request``, a ``probe`` and
a ``judge`` (see the package's docstring) and binds them into one ``Exercise``; this module holds what they
share: ``CheckFailed``, the probing helpers that run the learner's code and record what happened, and the
judging helpers that turn a failed call into feedback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how."""


def _fail(message: str):
    raise CheckFailed(message)


# --- probing: run the learner's code and record, never judge ------------------------------------
def _capture(value):
    """A learner's return value as data: tensors, numbers, strings, None; anything else by its type."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if value is Ellipsis:
        return None
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:  # numpy scalars
        return value.item()
    return {"type": type(value).__name__}


def _call(fn, *args) -> tuple[dict, object]:
    """Call the learner's code: ({"status": "ok"}, its value), or how it failed and None."""
    try:
        return {"status": "ok"}, fn(*args)
    except NotImplementedError:
        return {"status": "not_implemented"}, None
    except Exception as error:
        return {"status": "raised", "error": f"{type(error).__name__}: {error}"[:500]}, None


def _run(fn, *args) -> dict:
    """Call the learner's code and record the outcome with the value as data."""
    outcome, value = _call(fn, *args)
    return outcome | {"value": _capture(value)} if outcome["status"] == "ok" else outcome


def _answer_kind(answer) -> dict:
    return {"callable": callable(answer), "repr": repr(answer)[:100]}


def _probe_each_case(answer, cases: list, arguments) -> dict:
    """What ``answer`` is and, if it can be called, its probed call on ``arguments(case)`` for each case."""
    observed = _answer_kind(answer)
    if observed["callable"]:
        observed["calls"] = [_run(answer, *arguments(case)) for case in cases]
    return observed


# --- judging helpers ----------------------------------------------------------------------------
def _require_callable(observed: dict, name: str, kind: str = "function") -> None:
    if not observed["callable"]:
        _fail(f"{name} is {observed['repr']}, not a {kind}: define it (run the cell with your code) before running the check.")


def _value_of(call: dict, what: str):
    """The value a probed call returned, or the failure explained in the learner's terms."""
    if call["status"] == "not_implemented":
        _fail(f"{what} is not implemented yet: replace the `raise NotImplementedError` (or `...`) with your code.")
    if call["status"] == "raised":
        _fail(f"{what} raised {call['error']}")
    if call["value"] is None:  # the blank stub (`...`) or a forgotten `return`
        _fail(f"{what} returned None: it is not implemented yet (replace the `...` with your code), "
              "or a `return` is missing.")
    return call["value"]


def _close(a, b, atol=1e-5, rtol=1e-4) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b, atol=atol, rtol=rtol)


# --- for chapters whose requests alternate dtypes (float32 for even seeds, float64 for odd) -----------------------
def _seed_dtype(seed: int) -> torch.dtype:
    return torch.float64 if seed % 2 else torch.float32


def _randn(g, *shape, dtype) -> torch.Tensor:
    """Normal draws made in float64 and then cast, so a seed gives the same numbers in either dtype."""
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _close64(a, b, atol=1e-5, rtol=1e-4) -> bool:
    """``a`` equals ``b`` up to rounding, compared in float64 (either may be float32 or float64)."""
    return (isinstance(a, torch.Tensor) and a.is_floating_point() and tuple(a.shape) == tuple(b.shape)
            and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol))



@dataclass(frozen=True, repr=False)
class Exercise:
    """One checkable exercise: how to draw inputs, run the answer on them, and judge the result.

    Call it, ``check_lora_forward(lora_forward, seed=0)``, to do all three in one process (what the
    notebooks' otter tests do); grading calls ``request``, ``probe`` and ``judge`` apart. Its name is
    the variable a chapter module binds it to (``exercises_in`` gives it that name), and its
    ``__doc__`` is ``doc``, the one-line contract the learner's answer must meet.
    """

    answer_kind: str                          # "function" or "class"
    request: Callable[[int], dict]
    probe: Callable[[object, dict], dict]
    judge: Callable[[dict, dict], None]
    doc: str                                  # the contract, e.g. "``f(x)`` must be ..."

    def __post_init__(self):
        object.__setattr__(self, "__doc__", self.doc)
        object.__setattr__(self, "__name__", None)  # until a chapter module's variable names it

    def check(self, answer, seed: int = 0) -> None:
        request = self.request(seed)
        self.judge(request, self.probe(answer, request))

    def __call__(self, answer, seed: int = 0) -> None:
        """Check ``answer`` on the inputs drawn from ``seed``; raise ``CheckFailed`` saying how it is wrong."""
        self.check(answer, seed)

    def __repr__(self) -> str:
        return f"<exercise {self.__name__}: {self.__name__}(answer, seed=0) checks a {self.answer_kind}>"


def exercises_in(module: ModuleType) -> dict[str, Exercise]:
    """The exercises a chapter module defines, in order, each named by (and after) its variable."""
    found = {}
    for name, value in vars(module).items():
        if isinstance(value, Exercise):
            if value.__name__ not in (None, name):
                raise ValueError(f"{module.__name__}.{name} is the exercise {value.__name__} under a second name.")
            object.__setattr__(value, "__name__", name)
            object.__setattr__(value, "__qualname__", name)
            object.__setattr__(value, "__module__", module.__name__)
            found[name] = value
    return found
