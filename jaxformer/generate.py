"""python -m jaxformer.generate --workdir=DIR --prompt='def ' [--max_new_tokens=200]
       [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0]

Samples a continuation of the prompt from the latest checkpoint of a language-model run
(KV-cached, jit-compiled decoding; temperature 0 is greedy).
"""

from absl import flags
from ml_collections import config_flags

from jaxformer.cli import (define_distributed_flags, define_mesh_flags, initialize_distributed,
                           load_run_config, run, setup_logging, with_mesh)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file; default: the run\'s own.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory.', required=True)
_DISTRIBUTED = define_distributed_flags()
_MESH = define_mesh_flags()
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0 = greedy).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0 = all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  del argv
  setup_logging()
  initialize_distributed(_DISTRIBUTED)
  from jaxformer.config import ConfigError
  from jaxformer.train.trainer import Trainer
  config = with_mesh(load_run_config(_WORKDIR.value, _CONFIG.value), _MESH)
  trainer = Trainer(config, _WORKDIR.value, mode='eval')
  if trainer.exp.data.task != 'lm':
    raise ConfigError(f'generate samples language models; this run trains data.task='
                      f'{trainer.exp.data.task!r}')
  text = trainer.sample(_PROMPT.value, _MAX_NEW.value, temperature=_TEMPERATURE.value,
                        top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                        field='--max_new_tokens')
  trainer.close()
  print(_PROMPT.value + text)


if __name__ == '__main__':
  run(main)
