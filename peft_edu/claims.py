"""Claims in the book: the prose states only what the run on the page shows.

Two helpers for the chapter notebooks (CONTRIBUTING.md, "Claims in the book"):

* ``glue(name, value, fmt)`` puts a number computed by the page into its prose. It formats ``value``
  with ``fmt`` and hands the text to myst-nb's ``glue``; the markdown then writes {glue:text}`name`
  and the built page shows the number of *this* run, never one typed in by hand.
* ``claim(condition, statement, **evidence)`` checks a sentence of the prose against the run. It
  raises ``ClaimFailed`` (an ``AssertionError``) naming the statement and the evidence when the
  condition is false, so a page whose prose stopped being true fails the strict book build
  (``allow_errors: false``) and nbval, instead of publishing the sentence next to numbers that
  contradict it.

A claim lives in a hidden cell (tags ``remove-cell`` and ``otter_ignore``) right after the computation it
checks::

    claim(lora_acc >= full_acc - 0.05, "LoRA comes within 5 points of full fine-tuning",
          lora=lora_acc, full=full_acc)

The tolerance must be honest: wide enough for seed-to-seed and machine-to-machine noise of the
quantity, narrow enough that the sentence means something. Timing is checked only with a wide margin
(or not at all: check the deterministic quantity, bytes, FLOPs, counts, instead).
"""

from __future__ import annotations

__all__ = ["ClaimFailed", "claim", "glue"]


class ClaimFailed(AssertionError):
    """A sentence of the book that this run does not support."""


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    try:  # numpy / torch scalars
        if getattr(value, "ndim", None) == 0 or getattr(value, "shape", None) == ():
            return f"{float(value):.6g}"
    except (TypeError, ValueError):
        pass
    return repr(value)


def claim(condition, statement: str, **evidence) -> None:
    """Raise ``ClaimFailed`` naming ``statement`` and ``evidence`` (name=value pairs) if ``condition`` is false."""
    if not isinstance(statement, str) or not statement.strip():
        raise TypeError("claim(condition, statement, **evidence): the statement is the sentence of the prose, a non-empty str")
    if bool(condition):
        return None
    shown = ", ".join(f"{name}={_show(value)}" for name, value in evidence.items())
    raise ClaimFailed(f"The book claims: {statement!r}, but this run does not support it"
                      + (f" ({shown})" if shown else "") + ". Change the prose, or the experiment.")


def glue(name: str, value, fmt: str = "") -> str:
    """Glue ``format(value, fmt)`` under ``name`` for {glue:text}`name` in the prose; return the text.

    Without myst-nb (a plain Python session) it only returns the text.
    """
    text = format(value, fmt)
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # pragma: no cover - myst-nb comes with jupyter-book in every install of the course
        return text
    myst_glue(name, text, display=False)
    return text
