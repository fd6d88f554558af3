"""The exercise-check cases of the prompt_methods chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations


import torch

from chapter_cases import Chapter

from peft_edu import checks


# --- prompt methods -----------------------------------------------------------------------------
PROMPT_GENERIC = {
    "q1": r"the answer is not .* Count the trainable tensors",
    "q2": r"does not return \[1ⁿ; mask\]",
    "q3": r"does not equal softmax\(q \[P_K; K\]ᵀ",
    "q4": r"does not equal Σ exp",
    "q5": r"is not the factor by which n zero keys",
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


def _ones_in_front(m, n):
    return torch.cat([m.new_ones(m.shape[0], n), m], 1)


def _real_share(q, K, scale=True):
    s = q @ K.T
    return (s / q.shape[-1] ** 0.5 if scale else s).exp().sum(-1)


def _gate(q, K, P_K, scale=True, reduce="sum"):
    c = q.shape[-1] ** 0.5 if scale else 1.0
    a, b = (q @ P_K.T / c).exp(), (q @ K.T / c).exp()
    a, b = (a.sum(-1), b.sum(-1)) if reduce == "sum" else (a.mean(-1), b.mean(-1))
    return a / (a + b)


PROMPT_METHODS = Chapter(
    name="prompt_methods",
    questions={
        "q1": ("prefix_param_count", checks.check_prefix_param_count),
        "q2": ("extend_attention_mask", checks.check_extend_attention_mask),
        "q3": ("prefix_attention", checks.check_prefix_attention),
        "q4": ("gate_lambda", checks.check_gate_lambda),
        "q5": ("zero_prefix_scale", checks.check_zero_prefix_scale),
    },
    stub_must_not_contain=("softmax", "torch.cat", "2 * num_layers", ".exp()"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("forgets-K-and-V", lambda n, L, d, h=None: _ppc(n, L, d, h, two=1), r"factor 2 is missing"),
            ("one-layer-only", lambda n, L, d, h=None: _ppc(n, L, d, h, layers=False), r"one layer's prefix"),
            ("prompt-tuning-count", lambda n, L, d, h=None: n * d, r"prompt tuning's soft prompt"),
            ("mlp-without-biases", lambda n, L, d, h=None: _ppc(n, L, d, h, biases=False), r"biases .* are missing"),
            ("mlp-counts-the-table-too", lambda n, L, d, h=None: _ppc(n, L, d, h, table_too=True),
             r"added the table P"),
            ("mlp-counts-only-the-table", lambda n, L, d, h=None: n * 2 * L * d, r"size of the table P"),
            ("ignores-the-projection", lambda n, L, d, h=None: _ppc(n, L, d, None) + 1, PROMPT_GENERIC["q1"]),
        ],
        "q2": [
            ("appends-ones", lambda m, n: torch.cat([m, m.new_ones(m.shape[0], n)], 1), r"appended the ones"),
            ("prepends-zeros", lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1), r"prepended zeros"),
            ("appends-zeros", lambda m, n: torch.cat([m, m.new_zeros(m.shape[0], n)], 1), r"appended zeros"),
            ("repeats-first-column", lambda m, n: torch.cat([m[:, :1].repeat(1, n), m], 1), r"first column"),
            ("float-mask", lambda m, n: torch.cat([torch.ones(m.shape[0], n), m.float()], 1),
             r"keep the mask's dtype"),
            ("n-rows-not-columns", lambda m, n: torch.cat([m.new_ones(n, m.shape[1]), m], 0), r"should have shape"),
            ("modifies-in-place", lambda m, n: torch.cat([m.new_ones(m.shape[0], n), m.zero_().add_(1)], 1),
             r"changed the mask in place"),
            ("all-ones", lambda m, n: m.new_ones(m.shape[0], m.shape[1] + n), PROMPT_GENERIC["q2"]),
            # dtype and device: every seed passes int64, int32, bool and float32 masks, and one on the meta device
            ("peft-float32-ones", lambda m, n: torch.cat([torch.ones(m.shape[0], n, device=m.device), m], 1),
             r"keep the mask's dtype .* That is what PEFT returns"),
            ("int64-ones", lambda m, n: torch.cat([torch.ones(m.shape[0], n, dtype=torch.long, device=m.device), m], 1),
             r"you return dtype int64: keep the mask's dtype \((int32|bool)\)\. torch.cat promoted"),
            ("int64-for-a-bool-mask", lambda m, n: _ones_in_front(m.long() if m.dtype == torch.bool else m, n),
             r"for a bool mask .* you return dtype int64"),
            ("always-bool", lambda m, n: _ones_in_front(m, n).bool(), r"keep the mask's dtype"),
            ("ones-on-the-cpu", lambda m, n: torch.cat([torch.ones(m.shape[0], n, dtype=m.dtype), m], 1),
             r"'meta' device .* raised RuntimeError: .* on the mask's device"),
            ("result-moved-to-the-cpu", lambda m, n: _ones_in_front(m, n).cpu(),
             r"'meta' device .* raised NotImplementedError: Cannot copy out of meta tensor"),
            ("result-made-on-the-cpu", lambda m, n: torch.ones(m.shape[0], m.shape[1] + n, dtype=m.dtype).copy_(
                _ones_in_front(m, n)) if m.device.type != "meta" else torch.ones(m.shape[0], m.shape[1] + n, dtype=m.dtype),
             r"your result is on the cpu device"),
        ],
        "q3": [
            ("real-keys-only", lambda q, K, V, PK, PV: _softmax_attention(q, K, V), r"ignores the prefix"),
            ("two-softmaxes-summed",
             lambda q, K, V, PK, PV: _softmax_attention(q, PK, PV) + _softmax_attention(q, K, V),
             r"two separately normalised"),
            ("unscaled",
             lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([PV, V]), scale=False),
             r"not scaled"),
            ("keys-values-misaligned",
             lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([V, PV])),
             r"not in the same order"),
            ("softmax-over-queries", lambda q, K, V, PK, PV:
                torch.softmax(q @ torch.cat([PK, K]).T / q.shape[-1] ** 0.5, dim=0) @ torch.cat([PV, V]),
             r"wrong axis"),
            ("prefix-as-queries", lambda q, K, V, PK, PV: _softmax_attention(torch.cat([PK, q]), torch.cat([PK, K]),
                                                                             torch.cat([PV, V])),
             r"should have shape"),
            ("float32-for-float64-inputs", lambda q, K, V, PK, PV: _softmax_attention(
                q.float(), torch.cat([PK, K]).float(), torch.cat([PV, V]).float()), r"keep the inputs' dtype"),
            ("P_K-as-values",
             lambda q, K, V, PK, PV: _softmax_attention(q, torch.cat([PK, K]), torch.cat([PK[:, :V.shape[1]], V])),
             PROMPT_GENERIC["q3"]),
        ],
        "q4": [
            ("one-minus-lambda", lambda q, K, PK: 1 - _gate(q, K, PK), r"1 − λ"),
            ("unscaled", lambda q, K, PK: _gate(q, K, PK, scale=False), r"not scaled"),
            ("means-not-sums", lambda q, K, PK: _gate(q, K, PK, reduce="mean"), r"averaged the exponentials"),
            ("counts-keys", lambda q, K, PK: torch.full((q.shape[0],), PK.shape[0] / (PK.shape[0] + K.shape[0])),
             r"not a count of keys"),
            ("keepdim-shape", lambda q, K, PK: _gate(q, K, PK)[:, None], r"Right values, but shape"),
            ("float32-for-float64-inputs", lambda q, K, PK: _gate(q.float(), K.float(), PK.float()),
             r"keep the inputs' dtype"),
            ("scores-not-exponentials",
             lambda q, K, PK: (q @ PK.T).sum(-1) / ((q @ PK.T).sum(-1) + (q @ K.T).sum(-1)),
             PROMPT_GENERIC["q4"]),
        ],
        "q5": [
            ("no-op-ones", lambda q, K, n: torch.ones(q.shape[0], dtype=q.dtype), r"as a no-op"),
            ("no-op-number", lambda q, K, n: 1, r"as a no-op"),
            ("zeros", lambda q, K, n: torch.zeros(q.shape[0], dtype=q.dtype), r"You return 0"),
            ("returns-lambda", lambda q, K, n: n / (n + _real_share(q, K)), r"prefix's share of the attention, λ"),
            ("counts-one-virtual-token", lambda q, K, n: _real_share(q, K) / (1 + _real_share(q, K)),
             r"counted one virtual token"),
            ("unscaled", lambda q, K, n: _real_share(q, K, scale=False) / (n + _real_share(q, K, scale=False)),
             r"not scaled"),
            ("counts-keys", lambda q, K, n: torch.full((q.shape[0],), K.shape[0] / (n + K.shape[0]), dtype=q.dtype),
             r"depends on the scores"),
            ("float32-for-float64-inputs", lambda q, K, n: _real_share(q.float(), K.float()) / (n + _real_share(q.float(), K.float())),
             r"keep the inputs' dtype"),
            ("means-not-sums", lambda q, K, n: (q @ K.T / q.shape[-1] ** 0.5).exp().mean(-1) /
             (n + (q @ K.T / q.shape[-1] ** 0.5).exp().mean(-1)), PROMPT_GENERIC["q5"]),
        ],
    },
)
