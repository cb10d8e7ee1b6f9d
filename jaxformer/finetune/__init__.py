"""Fine-tuning (CATALOG K): start from an imported checkpoint (`init_from`), export the result
(`export`), build small local Hugging Face models for demos and tests (`make_hf`)."""

from jaxformer.finetune.init_from import load_initial_params, model_section, resolve

__all__ = ['load_initial_params', 'model_section', 'resolve']
