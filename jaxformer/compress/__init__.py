"""Compression (CATALOG H): quantization, pruning, distillation.

  config.py      the `compress` config section (qat, prune, distill); QuantScheme
  quant.py       weight quantization on the parameter tree (Qwix numerics), QAT fake quantization
  ptq.py         `python -m jaxformer.compress quantize`: a quantized run folder, and its loading
  prune.py       magnitude / SNIP pruning while training (masks in the train state)
  structured.py  head and FFN-unit pruning that shrinks the shapes
  prune_cli.py   `python -m jaxformer.compress prune`
  distill.py     knowledge distillation as a trainer mode
"""
