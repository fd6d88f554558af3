"""Every chapter's exercise-check cases, by chapter name: ``cases_<chapter>.py`` each hold one ``Chapter``."""

from cases_adapters import ADAPTERS
from cases_choosing import CHOOSING
from cases_dora import DORA
from cases_lora import LORA, GoodLoRA
from cases_lora_beyond_linear import LORA_BEYOND_LINEAR
from cases_many_tasks import MANY_TASKS
from cases_memory import MEMORY
from cases_prompt_methods import PROMPT_METHODS
from cases_qlora import QLORA

CHAPTERS = {chapter.name: chapter for chapter in (LORA, LORA_BEYOND_LINEAR, DORA, ADAPTERS, PROMPT_METHODS, MEMORY, QLORA, MANY_TASKS, CHOOSING)}

__all__ = ["CHAPTERS", "GoodLoRA"]
