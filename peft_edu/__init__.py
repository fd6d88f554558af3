"""peft_edu: parameter-efficient fine-tuning built from scratch, checked against Hugging Face PEFT.

    import peft_edu
    model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(r=8, target_modules=["query", "value"]))
    peft_edu.print_trainable_parameters(model)
    ...train...
    peft_edu.save_adapter(model, "my-adapter")        # loads with peft.PeftModel.from_pretrained too
"""

import logging as _logging

# bitsandbytes (imported by peft) logs, on a CPU with AVX-512 BF16, that it could not fetch an optional faster
# 4-bit kernel from the Hugging Face hub (the `kernels` package). The course is offline and its 4-bit code
# needs no such kernel: the line would only be noise in every chapter that imports peft.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())

# Importing a method's module registers it (registry.py): these imports are the list of the course's methods.
from .bottleneck import BnConfig, BottleneckAdapter, DoubleSeqBnConfig, MAMConfig, ParBnConfig, SeqBnConfig
from .config import ConfigUnion, PeftConfig
from .dora import DoraLinear
from .ia3 import IA3Config, IA3Linear
from .lora import LoraConfig, LoraLinear
from .lora_layers import DoraConv, DoraEmbedding, IA3Conv, LoraConv, LoraEmbedding, LoraMultiheadAttention
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig
from .qlora import Linear4bit, quantize_model
from .quantization import NF4Weight, dequantize_nf4, quantize_nf4
from .registry import register_method
from .chunked_loss import chunked_causal_lm_loss
from .named_adapters import active_adapter, delete_adapter, list_adapters, set_adapter
from .adapter_arithmetic import add_weighted_adapter
from .composition import (Fuse, Stack, add_adapter_fusion, composition_parameters, load_adapter_fusion,
                          save_adapter_fusion, set_active_adapters)
from .model import (
    add_adapter,
    count_parameters,
    disable_adapter,
    get_peft_model,
    load_adapter,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    save_adapter,
    unload,
    unmerge,
)

__all__ = [
    "LoraConfig", "PeftConfig", "LoraLinear", "DoraLinear", "count_parameters", "get_peft_model", "load_adapter", "merge",
    "print_trainable_parameters", "save_adapter", "unload", "unmerge", "IA3Config", "IA3Linear",
    "BnConfig", "SeqBnConfig", "DoubleSeqBnConfig", "ParBnConfig", "ConfigUnion", "MAMConfig", "BottleneckAdapter",
    "PrefixTuningConfig", "PromptTuningConfig", "PrefixEncoder", "PromptEmbedding", "register_method",
    "merge_and_unload", "disable_adapter", "add_adapter", "set_adapter", "delete_adapter", "active_adapter",
    "list_adapters", "add_weighted_adapter", "Stack", "Fuse", "set_active_adapters", "add_adapter_fusion",
    "composition_parameters", "save_adapter_fusion", "load_adapter_fusion",
    "Linear4bit", "quantize_model", "NF4Weight", "quantize_nf4", "dequantize_nf4",
    "LoraConv", "DoraConv", "LoraEmbedding", "DoraEmbedding", "LoraMultiheadAttention", "IA3Conv",
    "chunked_causal_lm_loss",
]
