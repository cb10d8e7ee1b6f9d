"""Fine-tuning (CATALOG K): start from an imported checkpoint and adapt it.

  config.py     the `finetune` config section (method, init_from, LoRA, unfreezing)
  init_from.py  load_initial_params: a jaxformer run, an HF directory or a .safetensors file
  fit.py        which model-config fields must match the checkpoint's
  lora.py       LoRA / QLoRA on the parameter tree: targets, A/B factors, merge
  export.py     python -m jaxformer.finetune.export: merged weights as HF or a jaxformer run
  make_hf.py    python -m jaxformer.finetune.make_hf: small random local HF checkpoints

Nothing is imported here: `jaxformer.train.experiment` reads `config` without loading the
Hugging Face machinery.
"""
