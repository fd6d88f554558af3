"""The exercise checks of "Choosing a method, measured" (``notebooks/choosing.ipynb``): each method's learning rate
chosen from a sweep's runs, the Pareto front of cost against accuracy, and the paired difference of two methods run
on the same seeds.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call. Every seed draws new inputs: sweeps of 1 to 6
methods at 2 to 5 rates spanning decades, with 1 to 4 seeds per rate and ties; tables of 3 to 15 methods with
ties, in ints or floats; 2 to 10 seeds given as lists, tuples, float32 or float64 tensors or numpy arrays. So an
answer fitted to the public test fails a hidden one. A request holds only data (numbers, strings, lists, dicts:
what grading sends into its sandbox).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from .core import Exercise, _answer_kind, _call, _capture, _fail, _require_callable, _value_of


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=g))


def _number(got, what: str, args: str) -> float:
    """The learner's value as a number (a 1-element tensor counts as one), or feedback saying why it is not one."""
    if isinstance(got, torch.Tensor) and got.numel() == 1 and got.dtype != torch.bool:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"For {args}, {what} returned a {kind}; return a number.")
    if not math.isfinite(got):
        _fail(f"For {args}, {what} returned {got}; return a finite number.")
    return got


def _probe_calls(answer, cases: list, arguments, as_data) -> list:
    """Each case's call of ``answer`` on ``arguments(case)``, its value recorded by ``as_data``: these answers return
    collections, whose items core's ``_capture`` would not record (it records a dict, a set or a tuple by its type)."""
    calls = []
    for case in cases:
        outcome, value = _call(answer, *arguments(case))
        calls.append(outcome | {"value": as_data(value)} if outcome["status"] == "ok" else outcome)
    return calls

# --- Exercise 1: each method's learning rate -----------------------------------------------------------------
_SWEEP_METHODS = ("head only", "full fine-tuning", "LoRA r=8", "rsLoRA r=64", "DoRA r=8", "IA³", "Houlsby",
                  "Pfeiffer", "parallel", "prefix tuning (MLP)", "P-tuning v2", "prompt tuning", "mix-and-match")
_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # about a factor 3 apart, five decades
# A case's validation and test splits have 256 sentences: an accuracy k/256 is exact in binary, so two rates whose
# mean accuracies are equal (a tie) give equal floats however the learner sums and divides.
_SPLIT = 256


def _choose(runs: list, key: str = "validation accuracy", score=lambda values: sum(values) / len(values),
            keep=lambda run: True, smaller_on_tie: bool = True) -> dict:
    """{method: the rate whose kept runs have the best ``score`` of their ``key``}, a tie to the smaller rate (or the
    larger). The reference and each recognised mistake are this rule with one of its parts changed."""
    values: dict = {}  # method -> rate -> the accuracies of its kept runs
    for run in runs:
        if keep(run):
            values.setdefault(run["method"], {}).setdefault(run["learning rate"], []).append(run[key])
    sign = 1 if smaller_on_tie else -1
    return {method: min(per_rate, key=lambda rate: (-score(per_rate[rate]), sign * rate))
            for method, per_rate in values.items()}


def choose_learning_rates_reference(runs: list) -> dict:
    """{method: the rate with the best mean validation accuracy over the seeds run at it; a tie to the smaller}."""
    return _choose(runs)


def _same_rate(a: float, b: float) -> bool:
    """Equal up to a float32 round trip: a method's rates are a factor 2 or more apart, so this tells them apart."""
    return math.isclose(a, b, rel_tol=1e-6)


def _agree(got: dict, answer: dict) -> bool:
    return got.keys() == answer.keys() and all(_same_rate(got[m], answer[m]) for m in got)


def _best_single_run_for_all(runs: list) -> dict:
    """The rate of the one best validation run of the whole sweep, for every method."""
    best = min(runs, key=lambda run: (-run["validation accuracy"], run["learning rate"]))
    return {run["method"]: best["learning rate"] for run in runs}


# A recognisable mistake: what it returns for a sweep, the feedback it gets, and whether the feedback shows the test
# accuracies too (beside the validation accuracies every feedback shows).
_RATE_MISTAKES = (
    (lambda runs: _choose(runs, key="test accuracy"),
     "you chose each rate on its test accuracy. Then the test split no longer measures anything unseen: the rate is "
     "fitted to it, and the test accuracy you report for it is optimistic. Choose on the \"validation accuracy\"; "
     "the test accuracy of the chosen rate is only reported.", True),
    (lambda runs: _choose(runs, score=max),
     "you took the rate of the best single run. One lucky seed can put a worse rate on top: average the validation "
     "accuracy over the seeds run at each rate and take the rate with the best mean.", False),
    (lambda runs: _choose(runs, keep=lambda run: run["seed"] == 0),
     "you looked at only seed 0's run of each rate (as the sweep's choose does: its grid has one seed per rate). "
     "Here some rates were run on more seeds, and every seed counts: average the validation accuracy over all the "
     "seeds run at that rate.", False),
    (lambda runs: _choose(runs, score=sum),
     "you summed the validation accuracies over the seeds, so a rate run on more seeds wins for having more runs. "
     "Average them: a mean compares rates run on different numbers of seeds.", False),
    (lambda runs: _choose(runs, smaller_on_tie=False),
     "on a tie of the mean validation accuracy you took the larger rate. Take the smaller: the runs give no reason "
     "to prefer either, and a smaller step is the safer default (less likely to diverge or to wash out what "
     "pretraining learned).", False),
)
_SAME_RATE_FEEDBACK = (
    "you gave every method the same rate. The best rates of methods differ by orders of magnitude (a soft prompt "
    "trains at a rate hundreds of times full fine-tuning's), so one rate would favour some methods: choose each "
    "method's rate from its own runs.")


def _sweep_rates(g: torch.Generator) -> list[float]:
    """2 to 5 rates: the sweep's grid (a centre / 3, the centre, the centre × 3) or steps of a ladder over decades."""
    n = _randint(g, 2, 6)
    if n == 3 and _randint(g, 0, 2):
        centre = (5e-3, 7e-4, 3e-2, 1e-4, 3e-3)[_randint(g, 0, 5)]
        return [centre / 3, centre, centre * 3]
    step = min(_randint(g, 1, 3), (len(_LADDER) - 1) // (n - 1))  # a factor about 3 or about 10 between neighbours
    start = _randint(g, 0, len(_LADDER) - step * (n - 1))
    return [_LADDER[start + step * i] for i in range(n)]


def _accuracy(k: int) -> float:
    return min(max(k, 0), _SPLIT) / _SPLIT


def _method_runs(g: torch.Generator, method: str) -> list[dict]:
    """One method's runs: the accuracy peaks at one of its rates and falls away from it; each rate has 1 to 4 seeds
    (0, 1, ...), whose validation and test accuracies scatter independently about the rate's quality."""
    rates = _sweep_rates(g)
    peak, top, fall = _randint(g, 0, len(rates)), _randint(g, 180, 236), _randint(g, 2, 16)
    runs = []
    for i, rate in enumerate(rates):
        quality = top - fall * abs(i - peak)
        for seed in range(_randint(g, 1, 5)):
            runs.append({"method": method, "learning rate": rate, "seed": seed,
                         "validation accuracy": _accuracy(quality + _randint(g, -8, 9)),
                         "test accuracy": _accuracy(quality + _randint(g, -8, 9))})
    return runs


def _plant_tie(g: torch.Generator, runs: list[dict]) -> list[dict]:
    """``runs`` of one method with a second rate tied with its best mean validation accuracy (exactly: k/256 values
    of the same mean), on as many seeds as the best rate or, where that mean allows, on the rate's own number."""
    best = choose_learning_rates_reference(runs)[runs[0]["method"]]
    rates = sorted({run["learning rate"] for run in runs})
    other = [rate for rate in rates if rate != best][_randint(g, 0, len(rates) - 1)]
    top = [round(run["validation accuracy"] * _SPLIT) for run in runs if run["learning rate"] == best]
    kept = [run for run in runs if run["learning rate"] != other]
    old = [run for run in runs if run["learning rate"] == other]
    n = len(old) if sum(top) * len(old) % len(top) == 0 else len(top)
    total = sum(top) * n // len(top)
    # an equal share each, then a spread that sums to zero, so the seeds differ but the mean is the tie
    ks = [total // n + (1 if i < total % n else 0) for i in range(n)]
    for i in range(0, n - 1, 2):
        d = _randint(g, 0, 6)
        ks[i], ks[i + 1] = ks[i] + d, ks[i + 1] - d
    tied = [{"method": runs[0]["method"], "learning rate": other, "seed": seed,
             "validation accuracy": _accuracy(k),
             "test accuracy": old[seed]["test accuracy"] if seed < len(old) else _accuracy(k + _randint(g, -8, 9))}
            for seed, k in enumerate(ks)]
    return kept + tied


def _sweep(g: torch.Generator, n_methods: int, tie_in: set) -> list[dict]:
    names = [_SWEEP_METHODS[i] for i in torch.randperm(len(_SWEEP_METHODS), generator=g)[:n_methods].tolist()]
    runs = []
    for i, name in enumerate(names):
        method_runs = _method_runs(g, name)
        runs += _plant_tie(g, method_runs) if i in tie_in else method_runs
    # shuffled: a tie must be broken by the rate, not by the order the runs come in
    return [runs[i] for i in torch.randperm(len(runs), generator=g).tolist()]


def _planted_sweep(g: torch.Generator) -> list[dict]:
    """3 to 5 methods, one with a tie at the top, redrawn until every recognised mistake (the same rate for all
    included) gives its own answer, each different from the right one: so each is named."""
    while True:
        runs = _sweep(g, _randint(g, 3, 6), tie_in={0})
        answers = [choose_learning_rates_reference(runs), _best_single_run_for_all(runs)]
        answers += [mistake(runs) for mistake, _, _ in _RATE_MISTAKES]
        if not any(_agree(a, b) for i, a in enumerate(answers) for b in answers[i + 1:]):
            return runs


def _rates_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = [_planted_sweep(g)]
    for _ in range(2):
        n_methods = _randint(g, 1, 7)
        cases.append(_sweep(g, n_methods, tie_in={0} if _randint(g, 0, 2) else set()))
    return {"cases": cases}


def _as_mapping(value):
    """A returned dict as data (its string keys with their captured values); anything else as ``_capture`` has it."""
    if isinstance(value, dict):
        return {"type": "dict", "items": [[key, _capture(item)] for key, item in value.items() if isinstance(key, str)],
                "others": [repr(key)[:60] for key in value if not isinstance(key, str)][:10]}
    return _capture(value)


def _rates_probe(choose_learning_rates, request: dict) -> dict:
    observed = _answer_kind(choose_learning_rates)
    if observed["callable"]:  # each call gets its own copy: an answer that edits the runs cannot spoil the next case
        observed["calls"] = _probe_calls(choose_learning_rates, request["cases"],
                                         lambda runs: ([dict(run) for run in runs],), _as_mapping)
    return observed


def _per_rate(runs: list, method: str, key: str = "validation accuracy") -> str:
    """A method's mean accuracy (``key``) at each of its rates, as feedback shows it."""
    values: dict = {}
    for run in runs:
        if run["method"] == method:
            values.setdefault(run["learning rate"], []).append(run[key])
    return ", ".join(f"{rate:.3g}: {sum(v) / len(v):.4f} ({len(v)} seed{'s' * (len(v) > 1)})"
                     for rate, v in sorted(values.items()))


def _chosen(got, runs: list, args: str) -> dict:
    """The learner's {method: rate} as numbers, or feedback on its form."""
    if not isinstance(got, dict) or got.get("type") != "dict" or "items" not in got:
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"For {args}, choose_learning_rates returned a {kind}; return a dict {{method: learning rate}}.")
    if got["others"]:
        _fail(f"For {args}, choose_learning_rates returned the keys {', '.join(got['others'])}; the keys are the "
              "methods' names, run[\"method\"].")
    methods = {run["method"] for run in runs}
    keys = {key for key, _ in got["items"]}
    if keys != methods:
        missing, extra = sorted(methods - keys), sorted(keys - methods)
        _fail(f"For {args}, choose_learning_rates returned the methods {sorted(keys)}: "
              + "; ".join(([f"{missing} are missing (every method in the runs gets a rate)"] if missing else [])
                          + ([f"{extra} are not methods of the runs"] if extra else [])) + ".")
    chosen = {}
    for method, value in got["items"]:
        if isinstance(value, dict) and value.get("type") in ("tuple", "list"):
            _fail(f"For {args}, the rate choose_learning_rates gives {method!r} is a {value['type']}; return the "
                  "learning rate alone, a number.")
        chosen[method] = _number(value, f"choose_learning_rates[{method!r}]", args)
    return chosen


def _rates_judge(request: dict, observed: dict) -> None:
    """``choose_learning_rates(runs)``: each method's rate of best mean validation accuracy, a tie to the smaller."""
    _require_callable(observed, "choose_learning_rates")
    for runs, call in zip(request["cases"], observed["calls"]):
        methods = sorted({run["method"] for run in runs})
        plural = "s" * (len(methods) > 1)
        args = f"the sweep of {len(runs)} runs of {len(methods)} method{plural} ({', '.join(methods)})"
        got = _chosen(_value_of(call, "choose_learning_rates"), runs, args)
        want = choose_learning_rates_reference(runs)
        if _agree(got, want):
            continue
        wrong = next(m for m in methods if not _same_rate(got[m], want[m]))
        where = (f"For {wrong!r} you chose {got[wrong]:.3g}; its mean validation accuracy per rate is "
                 f"{_per_rate(runs, wrong)}.")
        for mistake, feedback, on_test in _RATE_MISTAKES:
            if _agree(got, mistake(runs)):
                test = f" Its mean test accuracy per rate is {_per_rate(runs, wrong, 'test accuracy')}."
                _fail(f"For {args}: {feedback} {where}{test if on_test else ''}")
        if len(methods) > 1 and all(_same_rate(rate, got[wrong]) for rate in got.values()):
            _fail(f"For {args}: {_SAME_RATE_FEEDBACK} {where}")
        method_rates = {run["learning rate"] for run in runs if run["method"] == wrong}
        if not any(_same_rate(got[wrong], rate) for rate in method_rates):
            accuracies = {run[key] for run in runs if run["method"] == wrong
                          for key in ("validation accuracy", "test accuracy")}
            if min(accuracies) - 0.05 <= got[wrong] <= 1:  # every rate of a sweep is far below its accuracies
                _fail(f"For {args}, {got[wrong]!r} for {wrong!r} looks like an accuracy: return the learning rate "
                      "that reached it.")
            _fail(f"For {args}, {wrong!r} was never run at {got[wrong]!r}: its rates are "
                  f"{', '.join(f'{r:.3g}' for r in sorted(method_rates))}; return one of them.")
        _fail(f"For {args}, choose_learning_rates is not right. {where} The best mean is at {want[wrong]:.3g} (a tie "
              "goes to the smaller rate).")


check_choose_learning_rates = Exercise(
    "function", _rates_request, _rates_probe, _rates_judge,
    doc="``choose_learning_rates(runs)``: {method: the rate with the best mean validation accuracy over its seeds}, a "
        "tie to the smaller rate.")

# --- Exercise 2: the Pareto front ----------------------------------------------------------------------------
_METHODS = tuple(f"method {letter}" for letter in "ABCDEFGHIJKLMNOP")


def _dominates(cost_b, acc_b, cost_a, acc_a) -> bool:
    """b dominates a: no more costly, at least as accurate, and strictly better in one of the two."""
    return cost_b <= cost_a and acc_b >= acc_a and (cost_b < cost_a or acc_b > acc_a)


def _not_dominated(costs: dict, accuracies: dict, dominates) -> set:
    return {a for a in costs if not any(b != a and dominates(costs[b], accuracies[b], costs[a], accuracies[a])
                                        for b in costs)}


def pareto_front_reference(costs: dict, accuracies: dict) -> set:
    """The methods no other method dominates."""
    return _not_dominated(costs, accuracies, _dominates)


def _strict_front(costs, accuracies):  # dominated only when strictly cheaper and strictly more accurate
    return _not_dominated(costs, accuracies, lambda cb, ab, ca, aa: cb < ca and ab > aa)


def _weak_front(costs, accuracies):  # an exact tie counted as dominating: twins remove each other
    return _not_dominated(costs, accuracies, lambda cb, ab, ca, aa: cb <= ca and ab >= aa)


def _costly_front(costs, accuracies):  # a higher cost taken as better
    return _not_dominated(costs, accuracies, lambda cb, ab, ca, aa: _dominates(-cb, ab, -ca, aa))


def _values(units: list[int], as_floats: bool, scale: float) -> list:
    """Grid steps as numbers: ints, or floats (exact ties stay exact: a tie is the same step)."""
    return [round(u * scale, 4) if as_floats else u for u in units]


def _planted_case(g: torch.Generator, as_floats: bool) -> dict:
    """A front of 4-6 methods (steps of at least 2 on both axes) beside a twin of a front member (equal in both),
    a method tied with a front member on cost and one tied on accuracy (dominated, but not strictly on both axes),
    the most costly method at the lowest accuracy, and strictly dominated fillers. Built so that every
    recognised mistake returns its own set here: each is named."""
    size = _randint(g, 4, 7)
    cost = [_randint(g, 1, 4)]
    acc = [_randint(g, 40, 60)]  # at most 59 + 5 steps of 5: below 100
    for _ in range(size - 1):
        cost.append(cost[-1] + _randint(g, 2, 6))
        acc.append(acc[-1] + _randint(g, 2, 6))
    twin, on_cost, on_acc = _randint(g, 1, size), _randint(g, 1, size), _randint(g, 0, size - 1)
    points = list(zip(cost, acc)) + [
        (cost[twin], acc[twin]),
        (cost[on_cost], acc[on_cost - 1] + 1),     # as costly as a front member, less accurate than it
        (cost[on_acc] + 1, acc[on_acc]),           # as accurate as a front member, more costly than it
    ]
    for _ in range(_randint(g, 0, 15 - len(points))):
        i = _randint(g, 0, size)
        points.append((cost[i] + _randint(g, 1, 5), acc[i] - _randint(g, 1, 5)))  # strictly dominated by member i
    # the most costly method, less accurate than every front member: on the front only if a cost counted as good
    points.append((max(c for c, _ in points) + 2, acc[0] - 1))
    return _table(g, points, as_floats)


def _random_case(g: torch.Generator, as_floats: bool) -> dict:
    """3 to 15 methods on a coarse grid, so that ties on cost, on accuracy and on both come up."""
    n = _randint(g, 3, 16)
    points = [(_randint(g, 1, 7), _randint(g, 50, 57)) for _ in range(n)]
    return _table(g, points, as_floats)


def _table(g: torch.Generator, points: list, as_floats: bool) -> dict:
    names = [_METHODS[i] for i in torch.randperm(len(_METHODS), generator=g)[:len(points)].tolist()]
    costs = _values([c for c, _ in points], as_floats, 0.37)       # e.g. GB of memory, or millions of parameters
    accuracies = _values([a for _, a in points], as_floats, 0.01)  # accuracy, or correct answers of 100
    return {"costs": dict(zip(names, costs)), "accuracies": dict(zip(names, accuracies))}


def _front_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"cases": [_planted_case(g, bool(seed % 2)), _random_case(g, not seed % 2), _random_case(g, bool(seed % 2))]}


def _as_collection(value):
    """A returned set, frozenset, list or tuple as data (its type and items); anything else as ``_capture`` has it."""
    if isinstance(value, (set, frozenset, list, tuple)):
        items = list(value)
        return {"type": type(value).__name__, "items": [item for item in items if isinstance(item, str)],
                "others": [repr(item)[:60] for item in items if not isinstance(item, str)][:10]}
    return _capture(value)


def _front_probe(pareto_front, request: dict) -> dict:
    observed = _answer_kind(pareto_front)
    if observed["callable"]:
        observed["calls"] = _probe_calls(pareto_front, request["cases"],
                                         lambda case: (dict(case["costs"]), dict(case["accuracies"])), _as_collection)
    return observed


def _method_set(got, args: str) -> set:
    if not isinstance(got, dict) or "items" not in got:
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"For {args}, pareto_front returned a {kind}; return a set of method names.")
    if got["type"] not in ("set", "frozenset"):
        _fail(f"For {args}, pareto_front returned a {got['type']}; return a set of method names (the front has no "
              "order; set(...) of your names).")
    if got["others"]:
        _fail(f"For {args}, pareto_front returned {', '.join(got['others'])} in its set; return the methods' names "
              "(the keys of the dicts).")
    return set(got["items"])


def _names(methods) -> str:
    return "{" + ", ".join(repr(m) for m in sorted(methods)) + "}"


def _front_judge(request: dict, observed: dict) -> None:
    """``pareto_front(costs, accuracies)``: the set of methods that no other method dominates."""
    _require_callable(observed, "pareto_front")
    for case, call in zip(request["cases"], observed["calls"]):
        costs, accuracies = case["costs"], case["accuracies"]
        args = "the methods (cost, accuracy) " + ", ".join(f"{m}: ({costs[m]}, {accuracies[m]})" for m in sorted(costs))
        got = _method_set(_value_of(call, "pareto_front"), args)
        want = pareto_front_reference(costs, accuracies)
        if got == want:
            continue
        if got - set(costs):
            _fail(f"For {args}, pareto_front returned {_names(got - set(costs))}, which are not methods of the input.")
        if got == _strict_front(costs, accuracies):
            _fail(f"For {args}: you drop a method only when another is strictly cheaper and strictly more accurate, "
                  "so a method tied on one axis and worse on the other stays. It is dominated: another method has "
                  "cost <= and accuracy >= and is strictly better in at least one.")
        if got == _weak_front(costs, accuracies):
            _fail(f"For {args}: two methods equal in cost and in accuracy removed each other. Neither dominates the "
                  "other (dominating needs a strict improvement in at least one), so both are on the front.")
        if got == _costly_front(costs, accuracies):
            _fail(f"For {args}: you treat a higher cost as better. A method dominates another when it costs no more "
                  "and is at least as accurate.")
        if len(got) == 1 and costs[next(iter(got))] == min(costs.values()):
            _fail(f"For {args}: you return only the cheapest method. A costlier method belongs to the front too "
                  "when nothing that costs as little is as accurate.")
        left_out = set(costs) - got
        if got and want - got and min(accuracies[m] for m in got) >= max(accuracies[m] for m in left_out):
            _fail(f"For {args}: you return the {len(got)} most accurate methods. The front is chosen by both axes: "
                  f"{_names(want - got)} are cheaper and left out, yet no other method dominates them, so they are "
                  "on the front too.")
        missing, extra = want - got, got - want
        feedback = []
        if missing:
            feedback.append(f"{_names(missing)} are missing: no other method dominates them")
        if extra:
            by = {m: next(b for b in costs if _dominates(costs[b], accuracies[b], costs[m], accuracies[m]))
                  for m in sorted(extra)}
            feedback.append("you keep " + ", ".join(f"{m!r} (dominated by {b!r})" for m, b in by.items()))
        _fail(f"For {args}, pareto_front is not right: {'; '.join(feedback)}. A method is dominated when another has "
              "cost <= and accuracy >=, strictly better in at least one.")


check_pareto_front = Exercise(
    "function", _front_request, _front_probe, _front_judge,
    doc="``pareto_front(costs, accuracies)``: the set of methods that no other method dominates (cost <=, "
        "accuracy >=, strictly better in one).")

# --- Exercise 3: the paired difference -------------------------------------------------------------------------
_KINDS = ("list", "tuple", "float32 tensor", "float64 tensor", "numpy array")


def _as_given(values: list, kind: str):
    """The accuracies as the learner receives them."""
    if kind == "list":
        return list(values)
    if kind == "tuple":
        return tuple(values)
    if kind == "numpy array":
        return np.array(values, dtype=np.float64)
    return torch.tensor(values, dtype=torch.float32 if kind == "float32 tensor" else torch.float64)


def _exact(values: list, kind: str) -> torch.Tensor:
    """What the learner received, in float64 (a float32 tensor rounds the numbers first)."""
    return torch.tensor(values, dtype=torch.float32 if kind == "float32 tensor" else torch.float64).double()


def paired_difference_reference(accuracy_a, accuracy_b) -> tuple[float, float]:
    """(mean, sample sd) of the per-seed differences a - b."""
    if len(accuracy_a) != len(accuracy_b) or len(accuracy_a) < 2:
        raise ValueError(f"need the same seeds, at least 2, for both methods: got {len(accuracy_a)} and "
                         f"{len(accuracy_b)} accuracies")
    differences = np.asarray(accuracy_a, dtype=np.float64) - np.asarray(accuracy_b, dtype=np.float64)
    return float(differences.mean()), float(differences.std(ddof=1))


def _seed_accuracies(g: torch.Generator, n: int) -> tuple[list, list]:
    """Two methods' accuracies over n seeds: a shared seed effect (the split, the initialisation) and a per-seed
    difference of both signs whose mean is not 0, rounded as test-set accuracies are."""
    seed_effect = 0.03 * torch.randn(n, generator=g, dtype=torch.float64)
    b = (0.8 + seed_effect + 0.005 * torch.randn(n, generator=g, dtype=torch.float64)).tolist()
    differences = (0.01 + 0.015 * torch.randn(n, generator=g, dtype=torch.float64)).tolist()
    differences[0], differences[1] = abs(differences[0]) + 0.002, -abs(differences[1]) - 0.001
    a = [round(bk + dk, 4) for bk, dk in zip(b, differences)]
    b = [round(bk, 4) for bk in b]
    if sum(x - y for x, y in zip(a, b)) == 0:  # a mean of exactly 0 would hide a sign mistake
        a[0] = round(a[0] + 0.001, 4)
    return a, b


def _paired_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(4):
        n = 3 + (seed + 3 * i) % 8 if i == 0 else 2 + (seed * 3 + 5 * i) % 9  # the first has 3+: each mistake differs
        a, b = _seed_accuracies(g, n)
        cases.append({"a": a, "b": b, "kind": _KINDS[(seed + i) % len(_KINDS)]})
    shorter = _randint(g, 2, 9)
    longer = shorter + _randint(g, 1, 3)
    errors = [{"lengths": [shorter, longer] if seed % 2 else [longer, shorter],
               "kind": ("list", "float64 tensor")[seed % 2]},
              {"lengths": [1, 1], "kind": ("float64 tensor", "list")[seed % 2]}]
    for case in errors:
        case["a"], case["b"] = ([round(0.8 + 0.01 * k, 4) for k in range(length)] for length in case["lengths"])
    return {"cases": cases, "errors": errors}


def _as_pair(value):
    """A returned tuple or list as data (its type and captured items); anything else as ``_capture`` has it."""
    if isinstance(value, (tuple, list)):
        return {"type": type(value).__name__, "items": [_capture(item) for item in list(value)[:3]],
                "length": len(value)}
    return _capture(value)


def _paired_probe(paired_difference, request: dict) -> dict:
    observed = _answer_kind(paired_difference)
    if observed["callable"]:
        def arguments(case):
            return _as_given(case["a"], case["kind"]), _as_given(case["b"], case["kind"])
        observed["calls"] = _probe_calls(paired_difference, request["cases"], arguments, _as_pair)
        observed["errors"] = _probe_calls(paired_difference, request["errors"], arguments, _as_pair)
    return observed


def _close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)  # a float32 answer's rounding, far below any mistake


def _pair(got, args: str) -> tuple[float, float]:
    if not isinstance(got, dict) or "items" not in got:
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"For {args}, paired_difference returned a {kind}; return a tuple (mean, sd).")
    if got["length"] != 2:
        _fail(f"For {args}, paired_difference returned a {got['type']} of {got['length']} values; return two, "
              "(mean, sd).")
    return tuple(_number(item, "paired_difference's (mean, sd)", args) for item in got["items"])


def _paired_judge(request: dict, observed: dict) -> None:
    """``paired_difference(accuracy_a, accuracy_b)``: (mean, sample sd) of a - b; a ValueError naming the lengths."""
    _require_callable(observed, "paired_difference")
    for case, call in zip(request["cases"], observed["calls"]):
        a, b = _exact(case["a"], case["kind"]), _exact(case["b"], case["kind"])
        args = f"accuracy_a={case['a']} and accuracy_b={case['b']} (each a {case['kind']})"
        mean, sd = _pair(_value_of(call, "paired_difference"), args)
        want_mean, want_sd = paired_difference_reference(a, b)
        d = a - b
        if _close(mean, want_mean) and _close(sd, want_sd):
            continue
        if _close(mean, -want_mean) and _close(sd, want_sd):
            _fail(f"For {args}: your mean has the wrong sign; the difference is accuracy_a - accuracy_b, so a "
                  "positive mean says method a is better.")
        if _close(mean, d.abs().mean().item()):
            _fail(f"For {args}: you took absolute differences |a - b|. Keep the sign: a seed where b wins must pull "
                  "the mean down.")
        if not _close(mean, want_mean):
            _fail(f"For {args}, the mean of the differences a - b is not {mean!r}; average accuracy_a[i] - "
                  "accuracy_b[i] over the seeds.")
        if any(_close(sd, x.std(correction=c).item()) for x in (a, b) for c in (0, 1)):
            _fail(f"For {args}: your sd is the spread of one method's accuracies alone. Take the sd of the "
                  "per-seed differences a - b: the seed effect both methods share cancels in them.")
        if _close(sd, math.sqrt(a.var(correction=1).item() + b.var(correction=1).item())):
            _fail(f"For {args}: your sd treats the two methods as independent, √(var a + var b). They ran on the "
                  "same seeds: take the sd of the per-seed differences a - b, where the shared seed effect cancels.")
        if _close(sd, d.std(correction=0).item()):
            _fail(f"For {args}: that is the population sd (dividing by n); the sample sd divides by n - 1 "
                  "(ddof=1, torch's default correction).")
        if _close(sd, d.var(correction=1).item()):
            _fail(f"For {args}: that is the variance of the differences; return its square root, the sd.")
        if _close(sd, want_sd / math.sqrt(len(d))):
            _fail(f"For {args}: that is the standard error of the mean, sd / √n; return the sd itself.")
        _fail(f"For {args}, the sample sd of the differences a - b is not {sd!r}: √(Σ (dᵢ - d̄)² / (n - 1)).")
    for case, call in zip(request["errors"], observed["errors"]):
        n_a, n_b = case["lengths"]
        args = f"accuracy_a of {n_a} and accuracy_b of {n_b} values (each a {case['kind']})"
        need = ("the same seeds for both methods" if n_a != n_b else "at least two seeds (an sd needs two)")
        if call["status"] == "not_implemented":
            _value_of(call, "paired_difference")  # fails, saying so
        if call["status"] == "ok":
            _fail(f"For {args}, paired_difference returned instead of raising: raise a ValueError that names both "
                  f"lengths, since a paired difference needs {need}.")
        error = call["error"]
        if not error.startswith("ValueError:"):
            _fail(f"For {args}, paired_difference raised {error}. Check the lengths first and raise a ValueError "
                  f"naming them ({need}).")
        if not all(re.search(rf"(?<![\d.]){length}(?![\d.])", error) for length in (n_a, n_b)):
            _fail(f"For {args}, your {error!r} does not name the lengths, {n_a} and {n_b}: say them, so that the "
                  "caller sees which list is short.")


check_paired_difference = Exercise(
    "function", _paired_request, _paired_probe, _paired_judge,
    doc="``paired_difference(accuracy_a, accuracy_b)``: (mean, sample sd) of the per-seed differences a - b; a "
        "ValueError naming the lengths if they differ or are under 2.")
