"""peft_edu: parameter-efficient fine-tuning built from scratch, checked against Hugging Face PEFT.

    import peft_edu
    model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(r=8, target_modules=["query", "value"]))
    peft_edu.print_trainable_parameters(model)
    ...train...
    peft_edu.save_adapter(model, "my-adapter")        # loads with peft.PeftModel.from_pretrained too
"""

from .bottleneck import BottleneckAdapter
from .config import (
    BnConfig,
    ConfigUnion,
    DoubleSeqBnConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    ParBnConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SeqBnConfig,
)
from .dora import DoraLinear
from .ia3 import IA3Linear
from .lora import LoraLinear
from .prefix_tuning import PrefixEncoder
from .prompt_tuning import PromptEmbedding
from .model import (
    count_parameters,
    get_peft_model,
    load_adapter,
    merge,
    print_trainable_parameters,
    save_adapter,
    unload,
    unmerge,
)

__all__ = [
    "LoraConfig", "PeftConfig", "LoraLinear", "DoraLinear", "count_parameters", "get_peft_model", "load_adapter", "merge",
    "print_trainable_parameters", "save_adapter", "unload", "unmerge", "IA3Config", "IA3Linear",
    "BnConfig", "SeqBnConfig", "DoubleSeqBnConfig", "ParBnConfig", "ConfigUnion", "MAMConfig", "BottleneckAdapter",
    "PrefixTuningConfig", "PromptTuningConfig", "PrefixEncoder", "PromptEmbedding",
]
