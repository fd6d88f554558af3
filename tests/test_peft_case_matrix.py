"""PEFT's own custom-model test cases, run against peft_edu and PEFT side by side.

PEFT's ``tests/test_custom_models.py`` (PEFT 0.21.2, huggingface/peft) runs a list of (name, model, config class,
config) cases through every verb on small custom models. Its 68 LoRA (DoRA included) and IA³ cases are re-created
here on the same models (``parity.CUSTOM_MODELS``). Each one is classified:

* PASS: peft_edu builds the adapter, and everything ``parity.check_against_peft`` compares is equal to PEFT: the
  initial tensors, outputs, gradients, merge / unmerge / merge_and_unload (or both refuse to merge), disable_adapter,
  and adapter files both ways.
* UNSUPPORTED: peft_edu refuses the config with an error that names the option or the layer and says it is not
  supported.
* PEFT BUG: the one place where equality is the wrong aim. PEFT 0.21.2 adds the LoRA update of an
  nn.MultiheadAttention's out_proj twice (huggingface/peft PR #3774); ``parity.check_mha_against_peft`` pins that
  peft_edu adds it once and agrees with PEFT in everything else.
* WRONG: anything else. It fails the test.

Every case also states the class it is expected to get, so that a PASS that turns into a refusal fails as well.
"""

from __future__ import annotations

import copy
import warnings

import pytest
from peft import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

import peft_edu
from custom_models import build_custom, check_against_peft, check_mha_against_peft

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

PASS, UNSUPPORTED, PEFT_BUG, WRONG = "PASS", "UNSUPPORTED", "PEFT BUG", "WRONG"

# (PEFT's case name, model, method, config, the class expected)
CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", "LoraConfig", {"target_modules": "lin0"}, PASS),
    ("Vanilla MLP 2 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"]}, PASS),
    ("Vanilla MLP 3 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin1"]}, PASS),
    ("Vanilla MLP 4 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"]}, PASS),
    ("Vanilla MLP 5 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, PASS),
    ("Vanilla MLP 6 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1},
     PASS),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "use_dora": True}, PASS),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "use_dora": True},
     PASS),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", "LoraConfig",
     {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4}, UNSUPPORTED),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", "LoraConfig",
     {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}, UNSUPPORTED),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", "LoraConfig",
     {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}, PASS),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", "LoraConfig",
     {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="random")}, UNSUPPORTED),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", "LoraConfig",
     {"target_modules": ["lin0", "lin1"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average")},
     UNSUPPORTED),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", "LoraConfig",
     {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average_once")},
     UNSUPPORTED),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["conv1d"]}, PASS),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb"]}, PASS),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"]},
     PASS),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", "LoraConfig",
     {"target_modules": ["conv1d"], "use_dora": True}, PASS),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", "LoraConfig",
     {"target_modules": ["emb"], "use_dora": True}, PASS),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", "LoraConfig",
     {"target_modules": ["emb", "conv1d"], "use_dora": True}, PASS),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", "LoraConfig",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}, PASS),
    ("Conv1d LoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"]}, PASS),
    ("Conv1d LoRA with DoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"], "use_dora": True}, PASS),
    ("Conv2d 1 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"]}, PASS),
    ("Conv2d 2 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"]}, PASS),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}, PASS),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"], "use_dora": True},
     PASS),
    ("Conv2d Groups LoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"]}, PASS),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"]}, PASS),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True},
     UNSUPPORTED),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", "LoraConfig",
     {"target_modules": ["conv2d"], "use_dora": True}, UNSUPPORTED),
    ("Conv3d 1 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"]}, PASS),
    ("Conv3d 2 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"]}, PASS),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "use_dora": True}, PASS),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"], "use_dora": True},
     PASS),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", "LoraConfig",
     {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}, PASS),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", "LoraConfig",
     {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}, PASS),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", "LoraConfig",
     {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}, PASS),
    ("MHA 1 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha"]}, PEFT_BUG),
    ("MHA 2 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha", "lin0"]}, PEFT_BUG),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", "LoraConfig", {"target_parameters": ["lin0.weight"]},
     PASS),
    ("MLP 2 using nn.Parameter LoRA", "MLP", "LoraConfig",
     {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}, PASS),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", "LoraConfig",
     {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)}, UNSUPPORTED),
    ("Vanilla MLP 1 IA3", "MLP", "IA3Config", {"target_modules": "lin0", "feedforward_modules": []}, PASS),
    ("Vanilla MLP 2 IA3", "MLP", "IA3Config", {"target_modules": "lin0", "feedforward_modules": "lin0"}, PASS),
    ("Vanilla MLP 3 IA3", "MLP", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": []}, PASS),
    ("Vanilla MLP 4 IA3", "MLP", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}, PASS),
    ("Vanilla MLP 5 IA3", "MLP", "IA3Config", {"target_modules": ["lin1"], "feedforward_modules": []}, PASS),
    ("Vanilla MLP 6 IA3", "MLP", "IA3Config", {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}, PASS),
    ("Vanilla MLP 7 IA3", "MLP", "IA3Config", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}, PASS),
    ("Vanilla MLP 8 IA3", "MLP", "IA3Config",
     {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]}, PASS),
    ("Vanilla MLP 9 IA3", "MLP", "IA3Config",
     {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]}, PASS),
    ("transformers Conv1D 1 IA3", "EmbConv1D", "IA3Config",
     {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}, PASS),
    ("transformers Conv1D 2 IA3", "EmbConv1D", "IA3Config",
     {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]}, PASS),
    ("transformers Conv1D 1 IA3", "EmbConv1D", "IA3Config",
     {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]}, PASS),
    ("Conv2d 1 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": []}, PASS),
    ("Conv2d 2 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}, PASS),
    ("Conv2d 3 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}, PASS),
    ("Conv2d 4 IA3", "Conv2d", "IA3Config",
     {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}, PASS),
    ("Conv2d 5 IA3", "Conv2d", "IA3Config",
     {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}, PASS),
    ("Conv3d 1 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": []}, PASS),
    ("Conv3d 2 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}, PASS),
    ("Conv3d 3 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}, PASS),
    ("Conv3d 4 IA3", "Conv3d", "IA3Config",
     {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}, PASS),
    ("Conv3d 5 IA3", "Conv3d", "IA3Config",
     {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}, PASS),
    ("BD-LoRA A only", "MLP", "LoraConfig",
     {"target_modules": ["lin0", "lin1"], "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False)},
     UNSUPPORTED),
    ("BD-LoRA B only", "MLP", "LoraConfig",
     {"target_modules": ["lin0", "lin1"],
      "use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False)}, UNSUPPORTED),
    ("BD-LoRA both A and B", "MLP", "LoraConfig",
     {"target_modules": ["lin0", "lin1"],
      "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)},
     UNSUPPORTED),
]


def refusal_names_what(message: str, model_id: str, config: dict) -> bool:
    """An UNSUPPORTED error must say so and name the option (or its value) or the layer that is not supported."""
    subjects = [key for key in config if key != "target_modules"]
    subjects += [repr(value) for key, value in config.items() if isinstance(value, str) and key != "target_modules"]
    subjects += [f"{type(module).__name__}" for name, module in build_custom(model_id).named_modules() if name]
    return "not supported" in message and any(subject in message for subject in subjects)


def classify(model_id: str, method: str, config: dict, directory) -> tuple[str, str]:
    """(class, detail): the checks done, or the refusal's message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_edu.get_peft_model(build_custom(model_id), getattr(peft_edu, method)(**copy.deepcopy(config)))
    except (TypeError, ValueError, NotImplementedError) as refusal:
        message = str(refusal)
        return (UNSUPPORTED if refusal_names_what(message, model_id, config) else WRONG), message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's warnings (fan_in_fan_out corrected, grouped conv unmergeable)
            if model_id == "MHA":
                return PEFT_BUG, "; ".join(check_mha_against_peft(config, directory))
            return PASS, "; ".join(check_against_peft(model_id, method, config, directory))
    except AssertionError as difference:
        return WRONG, f"{type(difference).__name__}: {difference}"


def test_the_matrix_has_peft_s_68_lora_dora_and_ia3_cases():
    assert len(CASES) == 68
    assert sum(method == "IA3Config" for _, _, method, _, _ in CASES) == 22


def test_peft_s_custom_model_cases_side_by_side(tmp_path, capsys):
    results = []
    for index, (name, model_id, method, config, expected) in enumerate(CASES):
        outcome, detail = classify(model_id, method, config, tmp_path / str(index))
        results.append((name, model_id, expected, outcome, detail))
    counts = {kind: sum(outcome == kind for *_, outcome, _ in results) for kind in (PASS, UNSUPPORTED, PEFT_BUG, WRONG)}
    with capsys.disabled():
        print(f"\nPEFT's custom-model cases, peft_edu beside PEFT 0.21.2 ({len(results)} cases)")
        for name, model_id, _, outcome, detail in results:
            print(f"  {outcome:<11} {name} [{model_id}]" + ("" if outcome == PASS else f": {detail[:160]}"))
        print("  " + " | ".join(f"{kind}: {count}" for kind, count in counts.items()))
    wrong = [(name, detail) for name, _, _, outcome, detail in results if outcome == WRONG]
    assert not wrong, wrong
    unexpected = [(name, expected, outcome, detail) for name, _, expected, outcome, detail in results
                  if outcome != expected]
    assert not unexpected, unexpected
    assert counts[PASS] >= 55
