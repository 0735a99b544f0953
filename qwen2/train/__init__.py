"""Post-training: supervised fine-tuning (LoRA, QLoRA, full weights) and DPO, on the same model the
engine runs (qwen2.model), with adapters in PEFT's format (qwen2.io.adapter)."""
from qwen2.train.finetune import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune"]
