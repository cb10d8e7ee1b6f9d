"""Looking inside a model (CATALOG I): attention maps and rollout, gradient saliency and
integrated gradients, FGSM / PGD on the input embeddings, adversarial training and attention
entropy. docs/analysis.md describes every method; `python -m jaxformer.analyze` runs them on a
trained run. Plots (matplotlib) live in `plots`, imported on demand."""

from jaxformer.analysis import adversarial, attribution, entropy, inputs, maps, rollout

__all__ = ['adversarial', 'attribution', 'entropy', 'inputs', 'maps', 'rollout']
