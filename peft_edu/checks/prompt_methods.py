"""The prompt-methods chapter's exercise checks (``notebooks/prompt_methods.ipynb``): a prefix's parameter
count, the attention mask with virtual tokens, one attention head over [P_K; K], the unified view's gate,
and what a prefix of zeros does to attention.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call.
"""

from __future__ import annotations

import torch

from .core import Exercise, _answer_kind, _fail, _probe_each_case, _require_callable, _run, _value_of


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
    return _probe_each_case(prefix_param_count, request["cases"], lambda case: case)


def _prefix_params_judge(request: dict, observed: dict) -> None:
    """``prefix_param_count(num_virtual_tokens, num_layers, hidden, projection_hidden=None)``: PEFT's trainable count
    of the prefix.

    With n = num_virtual_tokens: without the projection n·2·L·d; with it the embedding n·d, Linear(d, h) and
    Linear(h, 2·L·d), biases included.
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
    doc="``prefix_param_count(num_virtual_tokens, num_layers, hidden, projection_hidden=None)`` must be PEFT's "
        "trainable count of a prefix.")


# --- Prompt-methods chapter: the attention mask with virtual tokens ------------------------------
# Every seed draws a mask of each dtype a caller may pass (tokenizers give int64; int32, bool and float 0/1
# masks occur too), each with padding, left or right, and one on PyTorch's "meta" device: a tensor with a shape,
# a dtype and a device but no data, the check's stand-in for a GPU tensor (the ones must be made on the mask's
# device). The extended mask keeps the caller's dtype and device, as peft_edu does and as transformers' own
# generate() does when it adds a column (mask.new_ones); PEFT 0.21.2 instead builds torch.ones (float32) and lets
# torch.cat promote, so its extended mask is float32 whatever the caller passed (same values, same outputs).
MASK_DTYPES = ("int64", "int32", "bool", "float32")
_META = ("PyTorch's 'meta' device (a tensor with a shape, a dtype and a device but no data: the check's stand-in "
         "for a mask on a GPU)")


def _mask_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    cases = []
    for i in range(len(MASK_DTYPES)):
        batch, T, n = draw(2, 6), draw(2, 10), draw(1, 7)
        lengths = torch.randint(1, T + 1, (batch,), generator=g)
        lengths[0], lengths[1] = T, draw(1, T)  # a full row and a padded one
        positions = torch.arange(T)[None, :]
        left = (seed + i) % 2 == 0  # left padding (for generate()) or right padding (for training)
        mask = positions >= (T - lengths)[:, None] if left else positions < lengths[:, None]
        cases.append({"mask": mask.to(getattr(torch, MASK_DTYPES[(seed + i) % len(MASK_DTYPES)])), "n": n})
    meta = {"shape": [draw(1, 6), draw(2, 10)], "dtype": MASK_DTYPES[(seed + 1) % len(MASK_DTYPES)], "n": draw(1, 7)}
    return {"cases": cases, "meta": meta}


def _mask_probe(extend_attention_mask, q: dict) -> dict:
    observed = _answer_kind(extend_attention_mask)
    if observed["callable"]:
        observed["calls"], observed["masks_after"] = [], []
        for case in q["cases"]:
            mask = case["mask"].clone()
            observed["calls"].append(_run(extend_attention_mask, mask, case["n"]))
            observed["masks_after"].append(mask)
        observed["meta_call"] = _run_on_meta(extend_attention_mask, q["meta"])
    return observed


def _run_on_meta(extend_attention_mask, meta: dict) -> dict:
    """The call on a meta mask, its result described (a meta tensor has no data to send). Every exception is
    recorded as raised: torch raises NotImplementedError when code asks a meta tensor for its data (.cpu(), .tolist())."""
    mask = torch.ones(meta["shape"], dtype=getattr(torch, meta["dtype"]), device="meta")
    try:
        value = extend_attention_mask(mask, meta["n"])
    except Exception as error:
        return {"status": "raised", "error": f"{type(error).__name__}: {error}"[:500]}
    if isinstance(value, torch.Tensor):
        value = {"type": "Tensor", "device": value.device.type, "shape": list(value.shape),
                 "dtype": str(value.dtype).removeprefix("torch.")}
    elif value is not None and value is not Ellipsis:
        value = {"type": type(value).__name__}
    return {"status": "ok", "value": None if value is Ellipsis else value}


def _type_name(value) -> str:
    return value.get("type") if isinstance(value, dict) else type(value).__name__


def _a(dtype: str) -> str:
    return f"an {dtype}" if dtype.startswith("int") else f"a {dtype}"


def _judge_mask_case(mask: torch.Tensor, n: int, got) -> None:
    dtype = str(mask.dtype).removeprefix("torch.")
    what = f"{_a(dtype)} mask of shape {tuple(mask.shape)} and n={n}"
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype)
    want = torch.cat([ones, mask], dim=1)
    if not isinstance(got, torch.Tensor):
        _fail(f"For {what} extend_attention_mask should return a tensor, it returned {_type_name(got)}.")
    if got.shape != want.shape:
        _fail(f"For {what} the new mask should have shape {tuple(want.shape)} (batch, n + T): one column per virtual "
              f"token in front of the {mask.shape[1]} real ones; yours has {tuple(got.shape)}.")
    values = got.to(torch.float64)
    if torch.equal(values, want.to(torch.float64)):
        if got.dtype == mask.dtype:
            return
        why = ""
        if got.dtype == torch.float32:
            why = (" That is what PEFT returns (torch.ones is float32 and torch.cat promotes the mask to it); transformers "
                   "reads a 2-D mask by value, so it works, but the exercise asks, as peft_edu and transformers' generate() "
                   "do, for the caller's dtype.")
        elif got.dtype == torch.int64:
            why = " torch.cat promoted the mask to the dtype of your ones (int64)."
        _fail(f"Right values, but for {what} you return dtype {str(got.dtype).removeprefix('torch.')}: keep the mask's "
              f"dtype ({dtype}).{why} mask.new_ones(...) makes ones of the mask's dtype and device.")
    zeros = torch.zeros_like(ones)

    def is_(*parts):
        return torch.equal(values, torch.cat(parts, dim=1).to(torch.float64))

    if is_(mask, ones):
        _fail("You appended the ones after the real tokens. The virtual tokens come first ([P; X]), so their columns "
              "go in front: [1ⁿ; mask].")
    if is_(zeros, mask):
        _fail("You prepended zeros: a 0 in the mask means 'padding, do not attend', so the model would ignore the "
              "virtual tokens. They must always be visible: prepend ones.")
    if is_(mask, zeros):
        _fail("You appended zeros. The virtual tokens come first and are always attended to: prepend n columns of ones.")
    if is_(mask[:, :1].expand(-1, n), mask):
        _fail("You repeated the mask's first column: for a left-padded row that is 0, and the row would not see the "
              "virtual tokens. Prepend ones, whatever the padding.")
    _fail(f"For {what} extend_attention_mask(mask, n) does not return [1ⁿ; mask]: n columns of ones, then the mask "
          "unchanged.")


def _judge_meta_case(meta: dict, call: dict) -> None:
    (batch, T), n, dtype = meta["shape"], meta["n"], meta["dtype"]
    what = f"{_a(dtype)} mask of shape {(batch, T)} on {_META}"
    if call["status"] == "raised":
        _fail(f"For {what} with n={n} your function raised {call['error'].rstrip('.')}. Make the result with torch operations on "
              "the mask's device, as it must be for a mask on a GPU: mask.new_ones(...) makes ones of the mask's dtype "
              "and device (or torch.ones(..., dtype=mask.dtype, device=mask.device)).")
    got = _value_of(call, "extend_attention_mask")
    if _type_name(got) != "Tensor":
        _fail(f"For {what} extend_attention_mask should return a tensor, it returned {_type_name(got)}.")
    if got["device"] != "meta":
        _fail(f"For {what} your result is on the {got['device']} device: keep it on the mask's device (mask.new_ones(...)).")
    if got["shape"] != [batch, n + T]:
        _fail(f"For {what} with n={n} the new mask should have shape {(batch, n + T)}; yours has {tuple(got['shape'])}.")
    if got["dtype"] != dtype:
        _fail(f"For {what} you return dtype {got['dtype']}: keep the mask's dtype ({dtype}).")


def _mask_judge(q: dict, observed: dict) -> None:
    """``extend_attention_mask(mask, n)`` must prepend n columns of ones, [1ⁿ; mask], of the mask's dtype and device."""
    _require_callable(observed, "extend_attention_mask")
    if any(not torch.equal(after, case["mask"]) for case, after in zip(q["cases"], observed["masks_after"])):
        _fail("extend_attention_mask changed the mask in place; return a new tensor.")
    for case, call in zip(q["cases"], observed["calls"]):
        _judge_mask_case(case["mask"], case["n"], _value_of(call, "extend_attention_mask"))
    _judge_meta_case(q["meta"], observed["meta_call"])


check_extend_attention_mask = Exercise(
    "function", _mask_request, _mask_probe, _mask_judge,
    doc="``extend_attention_mask(mask, n)`` must prepend n columns of ones to the (batch, T) mask, keeping its dtype "
        "and device.")


# --- Prompt-methods chapter: shared by the attention exercises -----------------------------------
# Each seed draws two cases, float32 and float64, of different shapes; the answer must keep the inputs' dtype.
ATTENTION_DTYPES = ("float32", "float64")


def _near(got, want, atol=1e-5, rtol=1e-4) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape and not got.is_complex()
            and torch.allclose(got.to(torch.float64), want.to(torch.float64), atol=atol, rtol=rtol))


def _draw_shapes(g) -> dict:
    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    T_q, T, n, d = draw(1, 6), draw(2, 9), draw(2, 6), 4 * draw(2, 5)
    if n == T:  # n ≠ T and d ≠ d_v: a swapped argument cannot pass by accident
        n = T - 1 if T > 2 else T + 1
    return {"T_q": T_q, "T": T, "n": n, "d": d, "d_v": d - 2 * draw(1, 3)}


def _probe_cases(answer, q: dict, names: tuple[str, ...]) -> dict:
    observed = _answer_kind(answer)
    if observed["callable"]:
        observed["calls"] = [_run(answer, *(case[k].clone() for k in names)) for case in q["cases"]]
    return observed


def _right_dtype(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.dtype != want.dtype:
        _fail(f"Right values, but {what} returns {str(got.dtype).removeprefix('torch.')} for "
              f"{str(want.dtype).removeprefix('torch.')} inputs: keep the inputs' dtype (no .float() or .double()).")


def _not_a_tensor(got, name: str) -> None:
    if not isinstance(got, torch.Tensor):
        _fail(f"{name} should return a tensor, it returned {_type_name(got)}.")


# --- Prompt-methods chapter: one attention head over [P_K; K] ----------------------------------
def _prefix_attention_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in ATTENTION_DTYPES:
        s = _draw_shapes(g)
        draw = {name: torch.randn(rows, cols, generator=g, dtype=torch.float64)
                for name, (rows, cols) in {"q": (s["T_q"], s["d"]), "K": (s["T"], s["d"]), "V": (s["T"], s["d_v"]),
                                           "P_K": (s["n"], s["d"]), "P_V": (s["n"], s["d_v"])}.items()}
        draw["P_K"], draw["P_V"] = draw["P_K"] * 1.5, draw["P_V"] + 1.0
        cases.append({k: v.to(getattr(torch, dtype)) for k, v in draw.items()})
    return {"cases": cases}


def _prefix_attention_probe(prefix_attention, q: dict) -> dict:
    return _probe_cases(prefix_attention, q, ("q", "K", "V", "P_K", "P_V"))


def _attend(q, K, V, scale=True):
    scores = q @ K.T
    if scale:
        scores = scores / K.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ V


def _judge_prefix_attention_case(case: dict, got) -> None:
    x, K, V, P_K, P_V = case["q"], case["K"], case["V"], case["P_K"], case["P_V"]
    all_K, all_V = torch.cat([P_K, K]), torch.cat([P_V, V])
    want = _attend(x, all_K, all_V)
    if _near(got, want):
        return _right_dtype(got, want, "prefix_attention")
    _not_a_tensor(got, "prefix_attention")
    if got.shape != want.shape:
        _fail(f"The output should have shape {tuple(want.shape)} (one row per query, the values' width); yours has "
              f"{tuple(got.shape)}. Only the real tokens have queries: the prefix adds keys and values, not rows.")
    if _near(got, _attend(x, K, V)):
        _fail("Your output ignores the prefix: it is attention over the real keys only. Concatenate [P_K; K] and "
              "[P_V; V] and take one softmax over all n + T keys.")
    if _near(got, _attend(x, P_K, P_V) + _attend(x, K, V)):
        _fail("You added two separately normalised attentions. There is one softmax over [P_K; K]: the prefix and "
              "the real tokens compete for the same attention weight (the gate λ of the unified view).")
    if _near(got, _attend(x, all_K, all_V, scale=False)):
        _fail("The scores are not scaled: divide q Kᵀ by √d (d = the keys' width) before the softmax.")
    if _near(got, _attend(x, all_K, torch.cat([V, P_V]))) or _near(got, _attend(x, torch.cat([K, P_K]), all_V)):
        _fail("Keys and values are not in the same order: the i-th key must belong to the i-th value "
              "([P_K; K] with [P_V; V]).")
    if _near(got, torch.softmax(x @ all_K.T / K.shape[-1] ** 0.5, dim=0) @ all_V):
        _fail("The softmax runs over the wrong axis: each query's weights over the n + T keys must sum to 1 (dim=-1).")
    _fail("prefix_attention(q, K, V, P_K, P_V) does not equal softmax(q [P_K; K]ᵀ / √d) [P_V; V].")


def _prefix_attention_judge(q: dict, observed: dict) -> None:
    """``prefix_attention(q, K, V, P_K, P_V)`` must be softmax(q [P_K; K]ᵀ / √d) [P_V; V]."""
    _require_callable(observed, "prefix_attention")
    for case, call in zip(q["cases"], observed["calls"]):
        _judge_prefix_attention_case(case, _value_of(call, "prefix_attention"))


check_prefix_attention = Exercise(
    "function", _prefix_attention_request, _prefix_attention_probe, _prefix_attention_judge,
    doc="``prefix_attention(q, K, V, P_K, P_V)`` must be softmax(q [P_K; K]ᵀ / √d) [P_V; V].")


# --- Prompt-methods chapter: the gate of the unified view ----------------------------------------
def _gate_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in ATTENTION_DTYPES:
        s = _draw_shapes(g)
        case = {"q": torch.randn(s["T_q"], s["d"], generator=g, dtype=torch.float64),
                "K": torch.randn(s["T"], s["d"], generator=g, dtype=torch.float64),
                "P_K": torch.randn(s["n"], s["d"], generator=g, dtype=torch.float64) * 1.5}
        cases.append({k: v.to(getattr(torch, dtype)) for k, v in case.items()})
    return {"cases": cases}


def _gate_probe(gate_lambda, q: dict) -> dict:
    return _probe_cases(gate_lambda, q, ("q", "K", "P_K"))


def _gate(s_prefix, s_real, reduce="sum"):
    a, b = s_prefix.exp(), s_real.exp()
    a, b = (a.sum(-1), b.sum(-1)) if reduce == "sum" else (a.mean(-1), b.mean(-1))
    return a / (a + b)


def _judge_gate_case(case: dict, got) -> None:
    x, K, P_K = case["q"], case["K"], case["P_K"]
    scale = K.shape[-1] ** 0.5
    s_prefix, s_real = x @ P_K.T / scale, x @ K.T / scale
    want = _gate(s_prefix, s_real)
    if _near(got, want):
        return _right_dtype(got, want, "gate_lambda")
    _not_a_tensor(got, "gate_lambda")
    if got.shape != want.shape:
        if got.numel() == want.numel() and _near(got.reshape(want.shape), want):
            _fail(f"Right values, but shape {tuple(got.shape)}: return one λ per query, shape {tuple(want.shape)}.")
        _fail(f"gate_lambda should return one number per query, shape {tuple(want.shape)}; yours has {tuple(got.shape)}.")
    if _near(got, 1 - want):
        _fail("You returned 1 − λ, the share of attention on the real tokens. λ is the prefix's share: "
              "Σ exp(q P_Kᵀ/√d) over the total.")
    if _near(got, _gate(x @ P_K.T, x @ K.T)):
        _fail("The scores are not scaled: use q P_Kᵀ / √d and q Kᵀ / √d, as the attention itself does.")
    n, T = P_K.shape[0], K.shape[0]
    if _near(got, torch.softmax(s_prefix, -1).sum(-1) / 2) or _near(got, torch.full_like(want, n / (n + T))):
        _fail("λ depends on the scores: it is Σ exp(q P_Kᵀ/√d) / (Σ exp(q P_Kᵀ/√d) + Σ exp(q Kᵀ/√d)), the prefix's "
              "share of one softmax over all n + T keys, not a count of keys.")
    if _near(got, want * T / n) or _near(got, _gate(s_prefix, s_real, reduce="mean")):
        _fail("You averaged the exponentials instead of summing them: with n prefix keys and T real keys the sums "
              "Σ exp(...) are what the softmax's denominator adds up.")
    _fail("gate_lambda(q, K, P_K) does not equal Σ exp(q P_Kᵀ/√d) / (Σ exp(q P_Kᵀ/√d) + Σ exp(q Kᵀ/√d)), per query "
          "(sums over the keys, dim=-1).")


def _gate_judge(q: dict, observed: dict) -> None:
    """``gate_lambda(q, K, P_K)``: per query, the prefix's share of the attention,
    λ = Σ exp(q P_Kᵀ/√d) / (Σ exp(q P_Kᵀ/√d) + Σ exp(q Kᵀ/√d)), the sums over the keys."""
    _require_callable(observed, "gate_lambda")
    for case, call in zip(q["cases"], observed["calls"]):
        _judge_gate_case(case, _value_of(call, "gate_lambda"))


check_gate_lambda = Exercise(
    "function", _gate_request, _gate_probe, _gate_judge,
    doc="``gate_lambda(q, K, P_K)`` must be, per query, the prefix's share of the attention (the unified view's λ).")


# --- Prompt-methods chapter: a prefix of zeros (predict, then run) -------------------------------
def _zero_prefix_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in ATTENTION_DTYPES:
        s = _draw_shapes(g)  # n ≥ 2: an answer that counts one virtual token cannot pass
        case = {"q": torch.randn(s["T_q"], s["d"], generator=g, dtype=torch.float64),
                "K": torch.randn(s["T"], s["d"], generator=g, dtype=torch.float64)}
        cases.append({**{k: v.to(getattr(torch, dtype)) for k, v in case.items()}, "n": s["n"]})
    return {"cases": cases}


def _zero_prefix_probe(zero_prefix_scale, q: dict) -> dict:
    observed = _answer_kind(zero_prefix_scale)
    if observed["callable"]:
        observed["calls"] = [_run(zero_prefix_scale, case["q"].clone(), case["K"].clone(), case["n"])
                             for case in q["cases"]]
    return observed


def _judge_zero_prefix_case(case: dict, got) -> None:
    x, K, n = case["q"], case["K"], case["n"]
    real = (x @ K.T / K.shape[-1] ** 0.5).exp().sum(-1)
    want = real / (n + real)
    if _near(got, want):
        return _right_dtype(got, want, "zero_prefix_scale")
    if isinstance(got, (int, float)) and not isinstance(got, bool) and got == 1:
        got = torch.ones_like(want)
    _not_a_tensor(got, "zero_prefix_scale")
    if got.shape != want.shape:
        _fail(f"zero_prefix_scale should return one factor per query, shape {tuple(want.shape)}; yours has "
              f"{tuple(got.shape)}.")
    if _near(got, torch.ones_like(want)):
        _fail("You return 1 for every query: a prefix of zeros as a no-op. It is not: a zero key scores q·0 = 0, and "
              "exp(0) = 1, so each of the n virtual tokens still takes part of the softmax's weight, and gives back a "
              "zero value for it.")
    if _near(got, torch.zeros_like(want)):
        _fail("You return 0: the zero values add nothing, but the real tokens keep their share of the attention, "
              "and their values still count.")
    if _near(got, n / (n + real)):
        _fail("You returned the prefix's share of the attention, λ. The output keeps the real tokens' share, 1 − λ "
              "(the zero values add nothing).")
    if _near(got, real / (1 + real)):
        _fail(f"You counted one virtual token: each of the n = {n} zero keys adds exp(0) = 1 to the softmax's denominator.")
    unscaled = (x @ K.T).exp().sum(-1)
    if _near(got, unscaled / (n + unscaled)):
        _fail("The scores are not scaled: the attention uses q Kᵀ / √d.")
    T = K.shape[0]
    if _near(got, torch.full_like(want, T / (n + T))) or _near(got, torch.full_like(want, 1 / (1 + n))):
        _fail("The factor depends on the scores: the n zero keys each add exp(0) = 1 to the denominator, the real "
              "keys add exp(q Kᵀ/√d), not 1 each.")
    _fail("zero_prefix_scale(q, K, n) is not the factor by which n zero keys and values scale each query's attention "
          "output. Write the softmax over the n + T keys with P_K = 0 and P_V = 0 and compare with the softmax over "
          "the T real keys alone.")


def _zero_prefix_judge(q: dict, observed: dict) -> None:
    """``zero_prefix_scale(q, K, n)``: per query, S / (n + S) with S = Σ exp(q Kᵀ/√d) over the real keys, the factor
    by which n zero keys and values scale the attention output."""
    _require_callable(observed, "zero_prefix_scale")
    for case, call in zip(q["cases"], observed["calls"]):
        _judge_zero_prefix_case(case, _value_of(call, "zero_prefix_scale"))


check_zero_prefix_scale = Exercise(
    "function", _zero_prefix_request, _zero_prefix_probe, _zero_prefix_judge,
    doc="``zero_prefix_scale(q, K, n)`` must be, per query, the factor by which a prefix of n zero keys and values "
        "scales the attention output.")
