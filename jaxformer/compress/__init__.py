"""Compression (CATALOG H): quantization, pruning, distillation.

  config.py    the `compress` config section (qat, prune, distill); QuantScheme
  quant.py     weight quantization on the parameter tree (Qwix numerics), QAT fake quantization
  ptq.py       `python -m jaxformer.compress quantize`: a quantized run folder, and its loading
"""
