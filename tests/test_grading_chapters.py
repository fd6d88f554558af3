"""Sandboxed grading (`make grade CHAPTER=...`) of every chapter but LoRA: right, blank, wrong, corrupt.

Submissions are built from each chapter's master notebook by ``tests/grading_helpers.py``; the LoRA chapter's
grading, with its hostile submissions, is in ``test_grading.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grading_helpers import grade, needs_bwrap, submission

from peft_edu.grading import questions_of

ROOT = Path(__file__).resolve().parents[1]

# the adapters chapter's q4: the cell's adapter, with its initialisation lines
IDENTITY_INIT_ADAPTER = """from torch import nn


class IdentityInitAdapter(nn.Module):
    def __init__(self, d, m):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        {init}

    def forward(self, h):
        return h + self.up(torch.relu(self.down(h)))
"""

# chapter -> the points of its questions, the answer names of its questions, right answers, one wrong answer per question, and a phrase of the
# feedback each wrong answer must get
CHAPTERS = {
    "adapters": {
        "points": {"q1": 1.0, "q2": 2.0, "q3": 2.0, "q4": 2.0},
        "answers": ["bottleneck_params", "adapter_forward", "ia3_scale_ffn", "IdentityInitAdapter"],
        "right": {
            "q1": "def bottleneck_params(d, reduction_factor):\n    m = d // reduction_factor\n    return 2 * d * m + m + d",
            "q2": ("def adapter_forward(h, W_down, b_down, W_up, b_up):\n"
                   "    return h + torch.relu(h @ W_down.T + b_down) @ W_up.T + b_up"),
            "q3": "def ia3_scale_ffn(x, W, b, l):\n    return (x * l) @ W.T + b",
            "q4": IDENTITY_INIT_ADAPTER.format(init="nn.init.zeros_(self.up.weight)\n        nn.init.zeros_(self.up.bias)"),
        },
        "wrong": {
            "q1": "def bottleneck_params(d, reduction_factor):\n    return 2 * d * (d // reduction_factor)",
            "q2": "def adapter_forward(h, W_down, b_down, W_up, b_up):\n    return torch.relu(h @ W_down.T + b_down) @ W_up.T + b_up",
            "q3": "def ia3_scale_ffn(x, W, b, l):\n    return (x @ W.T + b) * l",
            "q4": IDENTITY_INIT_ADAPTER.format(init="for p in self.parameters():\n            nn.init.zeros_(p)"),
        },
        "feedback": ["the two weight matrices only", "residual (skip) connection", "scaled the layer's output",
                     "it can never learn"],
    },
    "dora": {
        "points": {"q1": 1.0, "q2": 2.0, "q3": 2.0, "q4": 2.0},
        "answers": ["weight_norm", "dora_weight", "dora_forward", "gradient_through_norm"],
        "right": {
            "q1": "def weight_norm(W):\n    return (W * W).sum(dim=1).sqrt()",
            "q2": ("def dora_weight(W0, A, B, m, alpha, r):\n    V = W0 + alpha / r * B @ A\n"
                   "    return (m / V.norm(dim=1)).unsqueeze(1) * V"),
            "q3": ("def dora_forward(x, W0, A, B, m, alpha, r):\n    V = W0 + alpha / r * B @ A\n"
                   "    g = m / V.norm(dim=1).detach()\n    return (x @ V.T) * g"),
            "q4": ("def gradient_through_norm(V, m, G):\n    n = V.norm(dim=1, keepdim=True)\n    u = V / n\n"
                   "    return -(m[:, None] / n) * (G * u).sum(dim=1, keepdim=True) * u"),
        },
        "wrong": {
            "q1": "def weight_norm(W):\n    return W.norm(dim=0)",
            "q2": ("def dora_weight(W0, A, B, m, alpha, r):\n    V = W0 + B @ A\n"
                   "    return (m / V.norm(dim=1)).unsqueeze(1) * V"),
            "q3": ("def dora_forward(x, W0, A, B, m, alpha, r):\n    V = W0 + alpha / r * B @ A\n"
                   "    return (x @ V.T) * (m / V.norm(dim=1))"),
            "q4": "def gradient_through_norm(V, m, G):\n    return torch.zeros_like(V)",
        },
        "feedback": ["wrong axis", "missing its scaling alpha / r", "gradient flows through ‖V‖",
                     "as if detaching changed nothing"],
    },
    "prompt_methods": {
        "points": {"q1": 1.0, "q2": 1.0, "q3": 2.0, "q4": 2.0, "q5": 2.0},
        "answers": ["prefix_param_count", "extend_attention_mask", "prefix_attention", "gate_lambda",
                    "zero_prefix_scale"],
        "right": {
            "q1": ("def prefix_param_count(num_virtual_tokens, num_layers, hidden, projection_hidden=None):\n"
                   "    n, out, h = num_virtual_tokens, 2 * num_layers * hidden, projection_hidden\n"
                   "    return n * out if h is None else n * hidden + hidden * h + h + h * out + out"),
            "q2": ("def extend_attention_mask(mask, n):\n"
                   "    return torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask], 1)"),
            "q3": ("def prefix_attention(q, K, V, P_K, P_V):\n"
                   "    scores = q @ torch.cat([P_K, K]).T / K.shape[1] ** 0.5\n"
                   "    return torch.softmax(scores, dim=-1) @ torch.cat([P_V, V])"),
            "q4": ("def gate_lambda(q, K, P_K):\n"
                   "    weights = torch.softmax(q @ torch.cat([P_K, K]).T / q.shape[1] ** 0.5, dim=-1)\n"
                   "    return weights[:, :P_K.shape[0]].sum(-1)"),
            "q5": ("def zero_prefix_scale(q, K, n):\n"
                   "    real = torch.exp(q @ K.T / q.shape[1] ** 0.5).sum(-1)\n"
                   "    return real / (real + n)"),
        },
        "wrong": {
            "q1": ("def prefix_param_count(num_virtual_tokens, num_layers, hidden, projection_hidden=None):\n"
                   "    return num_virtual_tokens * num_layers * hidden"),
            "q2": ("def extend_attention_mask(mask, n):\n"
                   "    return torch.cat([mask, mask.new_ones(mask.shape[0], n)], 1)"),
            "q3": ("def prefix_attention(q, K, V, P_K, P_V):\n"
                   "    return torch.softmax(q @ torch.cat([P_K, K]).T, dim=-1) @ torch.cat([P_V, V])"),
            "q4": ("def gate_lambda(q, K, P_K):\n"
                   "    weights = torch.softmax(q @ torch.cat([P_K, K]).T / q.shape[1] ** 0.5, dim=-1)\n"
                   "    return weights[:, P_K.shape[0]:].sum(-1)"),
            "q5": "def zero_prefix_scale(q, K, n):\n    return torch.ones(q.shape[0], dtype=q.dtype)",
        },
        "feedback": ["factor 2 is missing", "appended the ones", "not scaled", "You returned 1 − λ", "as a no-op"],
    },
    "qlora": {
        "points": {"q1": 1.0, "q2": 1.0, "q3": 2.0},
        "answers": ["block_codes", "pack_codes", "dequantize_blocks"],
        "right": {
            "q1": ("def block_codes(block, levels):\n    s = block.float() / block.float().abs().max()\n"
                   "    return (s[:, None] - levels).abs().argmin(1)"),
            "q2": "def pack_codes(codes):\n    c = codes.to(torch.uint8)\n    return (c[0::2] << 4) | c[1::2]",
            "q3": ("def dequantize_blocks(packed, absmax, levels, block_size, count):\n"
                   "    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:count].long()\n"
                   "    return levels[codes] * torch.repeat_interleave(absmax, block_size)[:count]"),
        },
        "wrong": {
            "q1": ("def block_codes(block, levels):\n    s = block.float() / block.float().max()\n"
                   "    return (s[:, None] - levels).abs().argmin(1)"),
            "q2": "def pack_codes(codes):\n    c = codes.to(torch.uint8)\n    return (c[1::2] << 4) | c[0::2]",
            "q3": ("def dequantize_blocks(packed, absmax, levels, block_size, count):\n"
                   "    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:count].long()\n"
                   "    return levels[codes] / torch.repeat_interleave(absmax, block_size)[:count]"),
        },
        "feedback": ["divide by block.max()", "second code of each pair", "divide by the absmax"],
    },
    "many_tasks": {
        "points": {"q1": 2.0, "q2": 1.0, "q3": 1.0},
        "answers": ["mixed_lora_layer", "linear_delta", "agrees_with_sign"],
        "right": {
            "q1": ("def mixed_lora_layer(x, weight, A, B, scaling, adapter_of_row):\n"
                   "    down = torch.bmm(x, A[adapter_of_row].transpose(1, 2))\n"
                   "    return x @ weight.T + scaling * torch.bmm(down, B[adapter_of_row].transpose(1, 2))"),
            "q2": ("def linear_delta(As, Bs, scalings, weights):\n    c = weights * scalings\n"
                   "    b = c.abs().sqrt()\n    a = c.sign() * b\n"
                   "    return (Bs * b.view(-1, 1, 1)).sum(0) @ (As * a.view(-1, 1, 1)).sum(0)"),
            "q3": ("def agrees_with_sign(stacked):\n"
                   "    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)\n"
                   "    return stacked.sign() == elected"),
        },
        "wrong": {
            "q1": "def mixed_lora_layer(x, weight, A, B, scaling, adapter_of_row):\n    return x @ weight.T",
            "q2": ("def linear_delta(As, Bs, scalings, weights):\n"
                   "    return ((weights * scalings).view(-1, 1, 1) * (Bs @ As)).sum(0)"),
            "q3": "def agrees_with_sign(stacked):\n    return stacked.sign() == stacked.sum(0).sign()",
        },
        "feedback": ["base layer's x W₀ᵀ alone", "the exact sum of the updates", "elect +1 on a tie"],
    },
    "choosing": {
        "points": {"q1": 1.0, "q2": 2.0, "q3": 1.0},
        "answers": ["choose_learning_rates", "pareto_front", "paired_difference"],
        "right": {
            "q1": ("import statistics\n\n\ndef choose_learning_rates(runs):\n    scores = {}\n    for r in runs:\n"
                   "        scores.setdefault(r['method'], {}).setdefault(r['learning rate'], []).append(r['validation accuracy'])\n"
                   "    return {m: min(s, key=lambda lr: (-statistics.mean(s[lr]), lr)) for m, s in scores.items()}"),
            "q2": ("def pareto_front(costs, accuracies):\n    points = {m: (costs[m], -accuracies[m]) for m in costs}\n"
                   "    return {m for m in costs if not any(o != points[m] and all(x <= y for x, y in zip(o, points[m]))\n"
                   "                                         for o in points.values())}"),
            "q3": ("import numpy as np\n\n\ndef paired_difference(accuracy_a, accuracy_b):\n"
                   "    if len(accuracy_a) != len(accuracy_b) or len(accuracy_a) < 2:\n"
                   "        raise ValueError(f'{len(accuracy_a)} and {len(accuracy_b)} accuracies')\n"
                   "    d = np.asarray(accuracy_a, dtype=float) - np.asarray(accuracy_b, dtype=float)\n"
                   "    return float(d.mean()), float(d.std(ddof=1))"),
        },
        "wrong": {
            "q1": ("import statistics\n\n\ndef choose_learning_rates(runs):\n    scores = {}\n    for r in runs:\n"
                   "        scores.setdefault(r['method'], {}).setdefault(r['learning rate'], []).append(r['test accuracy'])\n"
                   "    return {m: min(s, key=lambda lr: (-statistics.mean(s[lr]), lr)) for m, s in scores.items()}"),
            "q2": ("def pareto_front(costs, accuracies):\n    return {a for a in costs if not any(\n"
                   "        costs[b] < costs[a] and accuracies[b] > accuracies[a] for b in costs)}"),
            "q3": ("import numpy as np\n\n\ndef paired_difference(accuracy_a, accuracy_b):\n"
                   "    if len(accuracy_a) != len(accuracy_b) or len(accuracy_a) < 2:\n"
                   "        raise ValueError(f'{len(accuracy_a)} and {len(accuracy_b)} accuracies')\n"
                   "    d = np.asarray(accuracy_a, dtype=float) - np.asarray(accuracy_b, dtype=float)\n"
                   "    return float(d.mean()), float(d.std())"),
        },
        "feedback": ["no longer measures anything unseen", "strictly cheaper and strictly more accurate", "population sd"],
    },
    "lora_beyond_linear": {
        "points": {"q1": 1.0, "q2": 1.0, "q3": 1.0},
        "answers": ["embedding_lora_forward", "merge_conv1d", "pissa_residual"],
        "right": {
            "q1": ("def embedding_lora_forward(tokens, table, A, B, scaling):\n"
                   "    lookup = torch.nn.functional.embedding\n"
                   "    return lookup(tokens, table) + scaling * lookup(tokens, A.T) @ B.T"),
            "q2": "def merge_conv1d(weight, A, B, scaling):\n    return weight + scaling * A.T @ B.T",
            "q3": ("def pissa_residual(W, r):\n    U, S, Vh = torch.linalg.svd(W, full_matrices=False)\n"
                   "    return U[:, r:] @ torch.diag(S[r:]) @ Vh[r:]"),
        },
        "wrong": {
            "q1": "def embedding_lora_forward(tokens, table, A, B, scaling):\n    return table[tokens]",
            "q2": "def merge_conv1d(weight, A, B, scaling):\n    return weight + scaling * B @ A",
            "q3": ("def pissa_residual(W, r):\n    U, S, Vh = torch.linalg.svd(W, full_matrices=False)\n"
                   "    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]"),
        },
        "feedback": ["frozen lookup table[tokens] only", "that is nn.Linear's layout", "returned the top-r part"],
    },
}

pytestmark = [needs_bwrap, pytest.mark.parametrize("chapter", list(CHAPTERS))]


def master(chapter: str) -> Path:
    return ROOT / "notebooks" / f"{chapter}.ipynb"


def test_questions_come_from_the_master_notebook(chapter):
    points = CHAPTERS[chapter]["points"]
    assert [(q.name, q.points, q.answer) for q in questions_of(master(chapter))] == [
        (q, p, answer) for (q, p), answer in zip(points.items(), CHAPTERS[chapter]["answers"])]


def test_right_blank_wrong_and_corrupt_submissions(chapter, tmp_path):
    case, notebook = CHAPTERS[chapter], master(chapter)
    right, wrong, full = case["right"], case["wrong"], case["points"]
    scores = grade(tmp_path, notebook, {
        "right": submission(notebook, right), "blank": submission(notebook, {}),
        **{f"wrong_{q}": submission(notebook, right | {q: answer}) for q, answer in wrong.items()},
        "corrupt": '{"cells": [ this is not json',
    })
    assert scores["right"] == full
    assert scores["blank"] == dict.fromkeys(full, 0.0)
    assert scores["corrupt"] == dict.fromkeys(full, 0.0)
    for q in wrong:
        assert scores[f"wrong_{q}"] == full | {q: 0.0}
    feedback = tmp_path / "out" / "feedback"
    for q, phrase in zip(wrong, case["feedback"]):
        assert phrase in (feedback / f"wrong_{q}.md").read_text()
    assert "could not be read as a notebook" in (feedback / "corrupt.md").read_text()
