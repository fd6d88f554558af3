"""The exercise-check cases of "Choosing a method, measured" (see ``check_cases`` for what a case holds)."""

from __future__ import annotations

import statistics

from chapter_cases import Chapter

from peft_edu import checks


# --- Exercise 1: each method's learning rate ---------------------------------------------------------------
def _rates(runs, key="validation accuracy", score=statistics.mean, keep=lambda run: True, tie_to=min):
    """{method: the best rate by ``score`` of its kept runs' ``key``}, a tie going to ``tie_to`` of the tied rates."""
    values = {}
    for run in runs:
        if keep(run):
            values.setdefault(run["method"], {}).setdefault(run["learning rate"], []).append(run[key])
    chosen = {}
    for method, per_rate in values.items():
        best = max(score(v) for v in per_rate.values())
        chosen[method] = tie_to(rate for rate, v in per_rate.items() if score(v) == best)
    return chosen


def _one_rate_for_all(runs):  # the rate of the single best run of the whole sweep, for every method
    best = max(runs, key=lambda run: run["validation accuracy"])
    return {run["method"]: best["learning rate"] for run in runs}


# --- Exercise 2: the Pareto front -----------------------------------------------------------------------------
def _front(costs, accuracies, dominates):
    return {a for a in costs
            if not any(b != a and dominates(costs[b], accuracies[b], costs[a], accuracies[a]) for b in costs)}


def _dominates(cb, ab, ca, aa):
    return cb <= ca and ab >= aa and (cb < ca or ab > aa)


def _right_front(costs, accuracies):
    return _front(costs, accuracies, _dominates)


# --- Exercise 3: the paired difference ------------------------------------------------------------------------
def _paired(statistic):
    """An answer that checks its inputs as asked and returns ``statistic(a, b)`` of the accuracies as floats."""
    def answer(accuracy_a, accuracy_b):
        if len(accuracy_a) != len(accuracy_b) or len(accuracy_a) < 2:
            raise ValueError(f"lengths {len(accuracy_a)} and {len(accuracy_b)}")
        return statistic([float(x) for x in accuracy_a], [float(y) for y in accuracy_b])
    return answer


def _differences(a, b):
    return [x - y for x, y in zip(a, b)]


def _zip_truncates(accuracy_a, accuracy_b):  # the right numbers, but no check: zip pairs what it can
    d = [float(x) - float(y) for x, y in zip(accuracy_a, accuracy_b)]
    return statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0.0


def _vague_error(accuracy_a, accuracy_b):
    if len(accuracy_a) != len(accuracy_b) or len(accuracy_a) < 2:
        raise ValueError("the two methods need the same seeds")
    d = [float(x) - float(y) for x, y in zip(accuracy_a, accuracy_b)]
    return statistics.mean(d), statistics.stdev(d)


CHOOSING = Chapter(
    name="choosing",
    questions={
        "q1": ("choose_learning_rates", checks.check_choose_learning_rates),
        "q2": ("pareto_front", checks.check_pareto_front),
        "q3": ("paired_difference", checks.check_paired_difference),
    },
    stub_must_not_contain=("validation accuracy", "mean", "dominates", "ValueError", "len(differences) - 1"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("on-test-accuracy", lambda runs: _rates(runs, key="test accuracy"), r"no longer measures anything unseen"),
            ("best-single-run", lambda runs: _rates(runs, score=max), r"the rate of the best single run"),
            ("seed-0-only", lambda runs: _rates(runs, keep=lambda run: run["seed"] == 0), r"only seed 0's run"),
            ("summed-over-seeds", lambda runs: _rates(runs, score=sum), r"summed the validation accuracies"),
            ("tie-to-the-larger-rate", lambda runs: _rates(runs, tie_to=max), r"you took the larger rate"),
            ("one-rate-for-all", _one_rate_for_all, r"you gave every method the same rate"),
            ("worst-rate", lambda runs: _rates(runs, score=lambda v: -statistics.mean(v)),
             r"choose_learning_rates is not right\. For .* The best mean is at"),
            ("accuracy-not-rate", lambda runs: {m: max(r["validation accuracy"] for r in runs if r["method"] == m)
                                                for m in _rates(runs)}, r"looks like an accuracy"),
            ("rate-and-accuracy", lambda runs: {m: (rate, 0.5) for m, rate in _rates(runs).items()},
             r"is a tuple; return the learning rate alone"),
            ("list-of-rates", lambda runs: list(_rates(runs).values()), r"returned a list; return a dict"),
            ("first-method-only", lambda runs: dict([next(iter(_rates(runs).items()))]), r"are missing"),
        ],
        "q2": [
            ("three-most-accurate", lambda costs, acc: set(sorted(acc, key=acc.get, reverse=True)[:3]),
             r"the 3 most accurate methods"),
            ("cheapest-only", lambda costs, acc: {min(costs, key=costs.get)}, r"only the cheapest method"),
            ("strict-on-both", lambda costs, acc: _front(costs, acc, lambda cb, ab, ca, aa: cb < ca and ab > aa),
             r"strictly cheaper and strictly more accurate"),
            ("tie-dominates", lambda costs, acc: _front(costs, acc, lambda cb, ab, ca, aa: cb <= ca and ab >= aa),
             r"equal in cost and in accuracy removed each other"),
            ("higher-cost-better",
             lambda costs, acc: _front(costs, acc, lambda cb, ab, ca, aa: _dominates(-cb, ab, -ca, aa)),
             r"treat a higher cost as better"),
            ("sorted-list", lambda costs, acc: sorted(_right_front(costs, acc)), r"returned a list; return a set"),
            ("accuracies-not-names", lambda costs, acc: {acc[m] for m in _right_front(costs, acc)},
             r"return the methods' names"),
            ("strict-on-cost-only", lambda costs, acc: _front(costs, acc, lambda cb, ab, ca, aa: cb < ca and ab >= aa),
             r"pareto_front is not right: you keep .* \(dominated by"),
        ],
        "q3": [
            ("mean-difference-sd-of-a", _paired(lambda a, b: (statistics.mean(a) - statistics.mean(b),
                                                              statistics.stdev(a))),
             r"spread of one method's accuracies alone"),
            ("population-sd", _paired(lambda a, b: (statistics.mean(_differences(a, b)),
                                                    statistics.pstdev(_differences(a, b)))),
             r"population sd"),
            ("absolute-differences", _paired(lambda a, b: (statistics.mean(abs(d) for d in _differences(a, b)),
                                                           statistics.stdev(abs(d) for d in _differences(a, b)))),
             r"absolute differences"),
            ("b-minus-a", _paired(lambda a, b: (statistics.mean(_differences(b, a)),
                                                statistics.stdev(_differences(b, a)))),
             r"wrong sign"),
            ("unpaired-sd", _paired(lambda a, b: (statistics.mean(_differences(a, b)),
                                                  (statistics.variance(a) + statistics.variance(b)) ** 0.5)),
             r"as independent"),
            ("variance", _paired(lambda a, b: (statistics.mean(_differences(a, b)),
                                               statistics.variance(_differences(a, b)))),
             r"the variance of the differences"),
            ("standard-error", _paired(lambda a, b: (statistics.mean(_differences(a, b)),
                                                     statistics.stdev(_differences(a, b)) / len(a) ** 0.5)),
             r"standard error"),
            ("no-length-check", _zip_truncates, r"returned instead of raising"),
            ("error-without-lengths", _vague_error, r"does not name the lengths"),
            ("a-list", _paired(lambda a, b: [statistics.mean(_differences(a, b)), statistics.stdev(_differences(a, b)),
                                             len(a)]), r"list of 3 values"),
        ],
    },
    fitted_by_hand=("q1", "q2", "q3"),  # their inputs are lists of dicts and dicts: test_choosing_answer_fitted_to_...
)
