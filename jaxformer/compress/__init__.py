"""Compression (CATALOG H): quantization, pruning, distillation.

  config.py    the `compress` config section (qat, prune, distill)
"""
