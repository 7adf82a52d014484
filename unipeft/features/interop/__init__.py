"""Exchange adapters with other PEFT libraries.

``unipeft.features.interop.peft`` reads and writes the directories of Hugging Face PEFT
(``PeftModel.save_pretrained``): LoRA, (IA)^3 and prompt tuning.
"""

from __future__ import annotations

from . import peft

__all__ = ["peft"]
