"""TRL's ``SFTTrainer`` trains a peft_edu model unchanged: SmolLM2 with LoRA on question-answer pairs, in the
chat template, loss on the answers only (TRL's prompt-completion format)."""

from __future__ import annotations

import pytest
import torch

import peft_edu
from peft_edu.assets import load_causal_lm, load_qa_pairs

trl = pytest.importorskip("trl", reason="trl is pinned in requirements-colab.txt: run make setup")

pytestmark = pytest.mark.slow

STEPS = 4


def conversations(rows):
    return [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in zip(rows["question"], rows["answer"])]


def test_sft_trainer_trains_only_the_adapter_and_the_loss_falls(tmp_path):
    import datasets

    tokenizer, model = load_causal_lm()
    torch.manual_seed(0)
    model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    pairs = datasets.Dataset.from_list(conversations(load_qa_pairs()["train"][:4]))

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
                         per_device_eval_batch_size=4, learning_rate=3e-3, max_length=96, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, gradient_checkpointing=True,
                         disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=pairs, processing_class=tokenizer)
    assert trainer.model is model, "SFTTrainer wrapped or replaced the peft_edu model"
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    assert after < before - 0.1, f"the answers' loss on the 4 pairs trained on did not fall: {before:.3f} -> {after:.3f}"
    for name, tensor in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], tensor), f"{name} is frozen but changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])]
    assert len(changed) == len(adapter_before), "some adapter tensors got no update (e.g. no gradient under checkpointing)"
    assert model.is_gradient_checkpointing
