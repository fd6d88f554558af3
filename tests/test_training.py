"""The shared training loop: it trains what requires grad (and nothing else), deterministically."""

from __future__ import annotations

import copy
import os
import tempfile

import datasets
import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, BertTokenizerFast

import peft_edu
from peft_edu.training import classification_loaders, evaluate_accuracy, full_run, train


def tiny_task(n=64, seed=0):
    """Token 5 in the sequence means class 1, token 6 class 0: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(10, 90, (n, 8), generator=g)
    ids[:, 3] = torch.where(labels == 1, 5, 6)
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": l} for i, l in zip(ids, labels)]
    return torch.utils.data.DataLoader(rows, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def tiny_model():
    torch.manual_seed(0)
    config = tiny_bert_config()
    config.num_labels = 2
    return BertForSequenceClassification(config)


def test_lora_training_learns_and_leaves_frozen_weights_alone():
    model = peft_edu.get_peft_model(tiny_model(), peft_edu.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loader = tiny_task()
    before = evaluate_accuracy(model, loader, torch.device("cpu"))
    history = train(model, loader, loader, epochs=20, lr=2e-2, device=torch.device("cpu"), progress=False)
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert set(history[0]) >= {"epoch", "train_loss", "steps", "seconds", "accuracy"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["accuracy"] > max(before, 0.8)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_training_is_seeded():
    runs = []
    for _ in range(2):
        model = peft_edu.get_peft_model(tiny_model(), peft_edu.LoraConfig(r=2, lora_dropout=0.1, target_modules=["query"]))
        history = train(model, tiny_task(), epochs=2, lr=1e-2, device=torch.device("cpu"), progress=False, seed=3)
        runs.append(([h["train_loss"] for h in history], copy.deepcopy(peft_edu.model.adapter_state_dict(model))))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_max_steps_stops_early():
    model = tiny_model()
    history = train(model, tiny_task(), epochs=5, max_steps=3, lr=1e-4, device=torch.device("cpu"), progress=False)
    assert sum(h["steps"] for h in history) == 3


def test_nothing_to_train_is_an_error():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="No parameter requires grad"):
        train(model, tiny_task(), device=torch.device("cpu"))


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_full_run_switch(monkeypatch, value, expected):
    monkeypatch.setenv("PEFT_EDU_FULL_RUN", value)
    assert full_run() is expected


def test_full_run_switch_rejects_typos(monkeypatch):
    monkeypatch.setenv("PEFT_EDU_FULL_RUN", "yes please")
    with pytest.raises(ValueError, match="PEFT_EDU_FULL_RUN"):
        full_run()


def test_classification_loaders_tokenise_pad_and_limit():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film"]
    tokenizer = _tiny_tokenizer(vocab)
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["good film", "bad", "good", "bad film film"], "label": [1, 0, 1, 0]}),
        "validation": datasets.Dataset.from_dict({"text": ["good film"], "label": [1]}),
    })
    loaders = classification_loaders(tokenizer, data, batch_size=8, limit={"train": 3})
    batch = next(iter(loaders["validation"]))
    assert batch["labels"].tolist() == [1]
    assert len(loaders["train"].dataset) == 3
    train_batch = next(iter(loaders["train"]))
    assert train_batch["input_ids"].shape[0] == 3
    assert train_batch["input_ids"].shape == train_batch["attention_mask"].shape
    assert (train_batch["attention_mask"] == 0).any()  # padded to the longest sentence in the batch


def _tiny_tokenizer(vocab):
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    return BertTokenizerFast(path)


# --- the learning-rate schedule and the summary line -------------------------------------------------
def _learning_rates_of_each_step(monkeypatch, **kwargs) -> list[float]:
    seen, step = [], torch.optim.AdamW.step

    def recording(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    train(tiny_model(), tiny_task(), epochs=2, lr=1e-2, device=torch.device("cpu"), progress=False,
          print_summary=False, **kwargs)
    return seen


def test_linear_schedule_decays_the_learning_rate_to_zero(monkeypatch):
    """Step t (0-based) of T uses lr·(1 - t/T), as transformers' Trainer does without warm-up."""
    total = 2 * len(tiny_task())
    assert _learning_rates_of_each_step(monkeypatch, lr_schedule="linear") == pytest.approx(
        [1e-2 * (1 - t / total) for t in range(total)])
    assert _learning_rates_of_each_step(monkeypatch, lr_schedule="linear", max_steps=3)[-1] == pytest.approx(1e-2 / 3)


def test_constant_schedule_keeps_the_learning_rate(monkeypatch):
    assert set(_learning_rates_of_each_step(monkeypatch)) == {1e-2}


def test_constant_schedule_is_the_default():
    runs = []
    for kwargs in ({}, {"lr_schedule": "constant"}):
        model = tiny_model()
        train(model, tiny_task(), epochs=1, lr=1e-2, device=torch.device("cpu"), progress=False, **kwargs)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_unknown_schedule_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"lr_schedule='cosine'.*'constant'.*'linear'"):
        train(tiny_model(), tiny_task(), lr_schedule="cosine", device=torch.device("cpu"), progress=False)


def test_print_summary_false_prints_nothing(capsys):
    history = train(tiny_model(), tiny_task(), epochs=2, lr=1e-3, device=torch.device("cpu"), progress=False,
                    print_summary=False)
    assert capsys.readouterr().out == "" and len(history) == 2
    train(tiny_model(), tiny_task(), epochs=1, lr=1e-3, device=torch.device("cpu"), progress=False)
    assert "epoch 1/1: train loss" in capsys.readouterr().out


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward and backward"])
def test_count_flops_counts_attention_on_a_cpu(backward):
    """scaled_dot_product_attention's CPU kernel has no formula in FlopCounterMode; count_flops gives it one, so a
    model counts the same with it as with attention written as matrix products (transformers' eager attention)."""
    counts, plain_counts = {}, {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = BertForSequenceClassification._from_config(tiny_bert_config(num_labels=2),
                                                           attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        model.eval()   # in training mode attention dropout sends sdpa to its decomposed path, which is counted anyway
        ids = torch.randint(5, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0])}
        step = (lambda: model(**batch).loss.backward()) if backward else (lambda: model(**batch))
        counts[implementation] = peft_edu.training.count_flops(step)
        with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
            step()
        plain_counts[implementation] = plain.get_total_flops()
    assert plain_counts["sdpa"] < plain_counts["eager"], "PyTorch now counts CPU attention itself: drop the mapping"
    assert counts["eager"] == plain_counts["eager"]
    # A fused attention's backward computes the scores Q·Kᵀ again instead of keeping them (PyTorch's formula for it
    # counts that): one more product of 2·batch·heads·length²·head size per layer than the eager backward.
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    recomputed = config.num_hidden_layers * 2 * 3 * config.num_attention_heads * 12 ** 2 * head_size if backward else 0
    assert counts["sdpa"] == counts["eager"] + recomputed
