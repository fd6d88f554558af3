"""The prompt-methods chapter's exercise checks (``notebooks/prompt_methods.ipynb``): a prefix's parameter
count, the attention mask with virtual tokens, one attention head over [P_K; K], and the unified view's
gate.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call.
"""

from __future__ import annotations

import torch

from .core import Exercise, _answer_kind, _close, _fail, _require_callable, _run, _value_of


# --- Prompt-methods chapter: parameters of a prefix ----------------------------------------------
def _prefix_params_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    random_cases = [[draw(1, 64), draw(2, 40), draw(16, 1024), None] for _ in range(2)]
    random_cases += [[draw(1, 64), draw(2, 40), draw(16, 1024), draw(8, 512)]]
    # MiniLM (P-tuning v2), SmolLM2 (d_kv = 3 kv heads x 64 = 192), SmolLM2 with the re-parameterisation
    return {"cases": [[10, 6, 384, None], [20, 30, 192, None], [10, 30, 192, 64]] + random_cases}


def _prefix_params_probe(prefix_param_count, request: dict) -> dict:
    observed = _answer_kind(prefix_param_count)
    if observed["callable"]:
        observed["calls"] = [_run(prefix_param_count, *case) for case in request["cases"]]
    return observed


def _prefix_params_judge(request: dict, observed: dict) -> None:
    """``prefix_param_count(n, num_layers, hidden, projection_hidden=None)``: PEFT's trainable count of the prefix.

    Without the projection n·2·L·d; with it the embedding n·d, Linear(d, h) and Linear(h, 2·L·d), biases included.
    """
    _require_callable(observed, "prefix_param_count")
    for (n, L, d, h), call in zip(request["cases"], observed["calls"]):
        got = _value_of(call, "prefix_param_count")
        out = 2 * L * d
        if h is None:
            want = n * out
        else:
            want = n * d + (d * h + h) + (h * out + out)
        if got == want:
            continue
        args = f"num_virtual_tokens={n}, num_layers={L}, hidden={d}, projection_hidden={h}"
        if h is None:
            if got == n * L * d:
                _fail(f"For {args} you return n·L·d = {got}: the factor 2 is missing. Every layer gets a key *and* a "
                      "value per virtual token, P_K and P_V.")
            if got == 2 * n * d:
                _fail(f"For {args} you return 2·n·d = {got}: that is one layer's prefix. Prefix tuning gives every "
                      "one of the num_layers attention layers its own keys and values.")
            if got == n * d:
                _fail(f"For {args} you return n·d = {got}: that is prompt tuning's soft prompt (input only). "
                      "A prefix has keys and values (×2) in every layer (×num_layers).")
        else:
            if got == n * out:
                _fail(f"For {args} you return the size of the table P = n·2·L·d = {got}. With the re-parameterisation "
                      "P is not trained directly: count what is, the embedding (n×d) and the MLP's two Linear layers.")
            if got == n * d + d * h + h * out:
                _fail(f"For {args} you return {got}: the biases of the MLP's two Linear layers (h and 2·L·d numbers) "
                      "are missing.")
            if got == n * d + (d * h + h) + (h * out + out) + n * out:
                _fail(f"For {args} you return {got}: you added the table P = n·2·L·d too. During training P is the "
                      "MLP's output, not a parameter.")
            if got == n * d + (d * h + h) + (h * L * d + L * d):
                _fail(f"For {args} you return {got}: the MLP's output has 2·L·d numbers per token (a key and a value "
                      "for each layer); the factor 2 is missing.")
        _fail(f"For {args} the answer is not {got!r}. Count the trainable tensors PEFT builds: without the projection "
              "one table of n rows of 2·L·d numbers; with it Embedding(n, d), Linear(d, h), Tanh, Linear(h, 2·L·d).")


check_prefix_param_count = Exercise(
    "function", _prefix_params_request, _prefix_params_probe, _prefix_params_judge,
    doc="``prefix_param_count(n, num_layers, hidden, projection_hidden=None)`` must be PEFT's trainable count of a prefix.")


# --- Prompt-methods chapter: the attention mask with virtual tokens ------------------------------
def _mask_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, T = 3 + seed % 2, 6 + seed % 3
    lengths = torch.randint(1, T, (batch,), generator=g)
    lengths[0] = T  # one full row, the others left-padded, as for generate()
    mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()
    return {"mask": mask, "n": int(torch.randint(2, 6, (1,), generator=g))}


def _mask_probe(extend_attention_mask, q: dict) -> dict:
    observed = _answer_kind(extend_attention_mask)
    if observed["callable"]:
        mask = q["mask"].clone()
        observed["call"] = _run(extend_attention_mask, mask, q["n"])
        observed["mask_after"] = mask
    return observed


def _mask_judge(q: dict, observed: dict) -> None:
    """``extend_attention_mask(mask, n)`` must prepend n columns of ones: [1ⁿ; mask], same dtype."""
    _require_callable(observed, "extend_attention_mask")
    if not torch.equal(observed["mask_after"], q["mask"]):
        _fail("extend_attention_mask changed the mask in place; return a new tensor.")
    got = _value_of(observed["call"], "extend_attention_mask")
    mask, n = q["mask"], q["n"]
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype)
    want = torch.cat([ones, mask], dim=1)
    if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got.to(mask.dtype), want):
        if got.dtype != mask.dtype:
            _fail(f"Right values, but dtype {got.dtype}: keep the mask's dtype ({mask.dtype}), e.g. mask.new_ones(...).")
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"extend_attention_mask should return a tensor, it returned "
              f"{got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The new mask should have shape {tuple(want.shape)} (batch, n + T): one column per virtual token in "
              f"front of the {mask.shape[1]} real ones; yours has {tuple(got.shape)}.")
    got = got.to(mask.dtype)
    if torch.equal(got, torch.cat([mask, ones], dim=1)):
        _fail("You appended the ones after the real tokens. The virtual tokens come first ([P; X]), so their columns "
              "go in front: torch.cat([ones, mask], dim=1).")
    if torch.equal(got, torch.cat([torch.zeros_like(ones), mask], dim=1)):
        _fail("You prepended zeros: a 0 in the mask means 'padding, do not attend', so the model would ignore the "
              "virtual tokens. They must always be visible: prepend ones.")
    if torch.equal(got, torch.cat([mask, torch.zeros_like(ones)], dim=1)):
        _fail("You appended zeros. The virtual tokens come first and are always attended to: prepend n columns of ones.")
    if torch.equal(got, torch.cat([mask[:, :1].expand(-1, n), mask], dim=1)):
        _fail("You repeated the mask's first column: for a left-padded row that is 0, and the row would not see the "
              "virtual tokens. Prepend ones, whatever the padding.")
    _fail("extend_attention_mask(mask, n) does not return [1ⁿ; mask]: n columns of ones, then the mask unchanged.")


check_extend_attention_mask = Exercise(
    "function", _mask_request, _mask_probe, _mask_judge,
    doc="``extend_attention_mask(mask, n)`` must prepend n columns of ones to the (batch, T) mask.")


# --- Prompt-methods chapter: one attention head over [P_K; K] ----------------------------------
def _prefix_attention_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    T_q, T, n, d, d_v = 4, 5 + seed % 3, 3, 8, 6  # d ≠ d_v, n ≠ T: a swapped argument cannot pass by accident
    return {"q": torch.randn(T_q, d, generator=g), "K": torch.randn(T, d, generator=g),
            "V": torch.randn(T, d_v, generator=g), "P_K": torch.randn(n, d, generator=g) * 1.5,
            "P_V": torch.randn(n, d_v, generator=g) + 1.0}


def _prefix_attention_probe(prefix_attention, q: dict) -> dict:
    observed = _answer_kind(prefix_attention)
    if observed["callable"]:
        observed["call"] = _run(prefix_attention, *(q[k].clone() for k in ("q", "K", "V", "P_K", "P_V")))
    return observed


def _attend(q, K, V, scale=True):
    scores = q @ K.T
    if scale:
        scores = scores / K.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ V


def _prefix_attention_judge(q: dict, observed: dict) -> None:
    """``prefix_attention(q, K, V, P_K, P_V)`` must be softmax(q [P_K; K]ᵀ / √d) [P_V; V]."""
    _require_callable(observed, "prefix_attention")
    got = _value_of(observed["call"], "prefix_attention")
    x, K, V, P_K, P_V = q["q"], q["K"], q["V"], q["P_K"], q["P_V"]
    all_K, all_V = torch.cat([P_K, K]), torch.cat([P_V, V])
    want = _attend(x, all_K, all_V)
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"prefix_attention should return a tensor, it returned "
              f"{got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The output should have shape {tuple(want.shape)} (one row per query, the values' width); yours has "
              f"{tuple(got.shape)}. Only the real tokens have queries: the prefix adds keys and values, not rows.")
    if _close(got, _attend(x, K, V)):
        _fail("Your output ignores the prefix: it is attention over the real keys only. Concatenate [P_K; K] and "
              "[P_V; V] and take one softmax over all n + T keys.")
    if _close(got, _attend(x, P_K, P_V) + _attend(x, K, V)):
        _fail("You added two separately normalised attentions. There is one softmax over [P_K; K]: the prefix and "
              "the real tokens compete for the same attention weight (the gate λ of the unified view).")
    if _close(got, _attend(x, all_K, all_V, scale=False)):
        _fail("The scores are not scaled: divide q Kᵀ by √d (d = the keys' width) before the softmax.")
    if _close(got, _attend(x, torch.cat([P_K, K]), torch.cat([V, P_V]))) or _close(got, _attend(x, torch.cat([K, P_K]), all_V)):
        _fail("Keys and values are not in the same order: the i-th key must belong to the i-th value "
              "([P_K; K] with [P_V; V]).")
    if _close(got, torch.softmax(x @ all_K.T / K.shape[-1] ** 0.5, dim=0) @ all_V):
        _fail("The softmax runs over the wrong axis: each query's weights over the n + T keys must sum to 1 (dim=-1).")
    _fail("prefix_attention(q, K, V, P_K, P_V) does not equal softmax(q [P_K; K]ᵀ / √d) [P_V; V].")


check_prefix_attention = Exercise(
    "function", _prefix_attention_request, _prefix_attention_probe, _prefix_attention_judge,
    doc="``prefix_attention(q, K, V, P_K, P_V)`` must be softmax(q [P_K; K]ᵀ / √d) [P_V; V].")


# --- Prompt-methods chapter: the gate of the unified view ----------------------------------------
def _gate_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    T_q, T, n, d = 5, 6 + seed % 4, 2 + seed % 3, 8
    return {"q": torch.randn(T_q, d, generator=g), "K": torch.randn(T, d, generator=g),
            "P_K": torch.randn(n, d, generator=g) * 1.5}


def _gate_probe(gate_lambda, q: dict) -> dict:
    observed = _answer_kind(gate_lambda)
    if observed["callable"]:
        observed["call"] = _run(gate_lambda, q["q"].clone(), q["K"].clone(), q["P_K"].clone())
    return observed


def _gate_judge(q: dict, observed: dict) -> None:
    """``gate_lambda(q, K, P_K)``: per query, the share of attention on the prefix, λ = Σ e^{s_P} / (Σ e^{s_P} + Σ e^{s_K})."""
    _require_callable(observed, "gate_lambda")
    got = _value_of(observed["call"], "gate_lambda")
    x, K, P_K = q["q"], q["K"], q["P_K"]
    scale = K.shape[-1] ** 0.5

    def gate(s_prefix, s_real):
        a, b = s_prefix.exp().sum(-1), s_real.exp().sum(-1)
        return a / (a + b)

    want = gate(x @ P_K.T / scale, x @ K.T / scale)
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"gate_lambda should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        if got.numel() == want.numel() and _close(got.reshape(want.shape), want):
            _fail(f"Right values, but shape {tuple(got.shape)}: return one λ per query, shape {tuple(want.shape)}.")
        _fail(f"gate_lambda should return one number per query, shape {tuple(want.shape)}; yours has {tuple(got.shape)}.")
    if _close(got, 1 - want):
        _fail("You returned 1 − λ, the share of attention on the real tokens. λ is the prefix's share: "
              "Σ exp(q P_Kᵀ/√d) over the total.")
    if _close(got, gate(x @ P_K.T, x @ K.T)):
        _fail("The scores are not scaled: use q P_Kᵀ / √d and q Kᵀ / √d, as the attention itself does.")
    if _close(got, torch.softmax(x @ P_K.T / scale, -1).sum(-1) / 2) or _close(got, torch.full_like(want, P_K.shape[0] / (P_K.shape[0] + K.shape[0]))):
        _fail("λ depends on the scores: it is Σ exp(q P_Kᵀ/√d) / (Σ exp(q P_Kᵀ/√d) + Σ exp(q Kᵀ/√d)), the prefix's "
              "share of one softmax over all n + T keys, not a count of keys.")
    if _close(got, gate(x @ P_K.T / scale, x @ K.T / scale) * K.shape[0] / P_K.shape[0]) or \
            _close(got, (x @ P_K.T / scale).exp().mean(-1) / ((x @ P_K.T / scale).exp().mean(-1) + (x @ K.T / scale).exp().mean(-1))):
        _fail("You averaged the exponentials instead of summing them: with n prefix keys and T real keys the sums "
              "Σ exp(...) are what the softmax's denominator adds up.")
    _fail("gate_lambda(q, K, P_K) does not equal Σ exp(q P_Kᵀ/√d) / (Σ exp(q P_Kᵀ/√d) + Σ exp(q Kᵀ/√d)), per query "
          "(sums over the keys, dim=-1).")


check_gate_lambda = Exercise(
    "function", _gate_request, _gate_probe, _gate_judge,
    doc="``gate_lambda(q, K, P_K)`` must be, per query, the prefix's share of the attention (the unified view's λ).")
