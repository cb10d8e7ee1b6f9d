"""Fine-tuning (CATALOG K): start from an imported checkpoint and adapt it.

  config.py     the `finetune` config section (method, init_from, LoRA, unfreezing)
  lora.py       LoRA / QLoRA on the parameter tree: targets, A/B factors, merge
"""
