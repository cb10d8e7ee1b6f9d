"""python -m jaxformer.analyze --workdir=DIR --text='def f(x):' --method=rollout --out=maps.png
       [--target=ID --position=P --score=log_prob|logit --steps=64 --baseline=pad|zero
        --eps=0.01 --random_start --seed=0] [--config=FILE[:arg]] [--mesh=data=1]

Looks inside the latest checkpoint of a run (docs/analysis.md): attention maps per layer and head
(`maps`), attention rollout (`rollout`), gradient saliency (`saliency`), integrated gradients
(`ig`), FGSM and PGD on the input embeddings (`fgsm`, `pgd`), for a language-model or a text
classification run. Writes the PNG `--out` and the numbers beside it (`--out` with suffix
.json), and prints the JSON's path.
"""

from absl import flags
from ml_collections import config_flags

from jaxformer.cli import (define_distributed_flags, define_mesh_flags, initialize_distributed,
                           load_run_config, run, setup_logging, with_mesh)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file; default: the run\'s own.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory.', required=True)
_DISTRIBUTED = define_distributed_flags()
_MESH = define_mesh_flags()
_TEXT = flags.DEFINE_string('text', None, 'The text to analyse.', required=True)
_METHOD = flags.DEFINE_string('method', 'maps',
                              'maps | rollout | saliency | ig | fgsm | pgd.')
_OUT = flags.DEFINE_string('out', 'analysis.png', 'The PNG to write (and its .json).')
_TARGET = flags.DEFINE_integer('target', None, 'Token id or class attributed / attacked '
                               '(default: the model\'s prediction).')
_POSITION = flags.DEFINE_integer('position', None, 'LM position whose prediction is '
                                 'attributed (default: the last).')
_SCORE = flags.DEFINE_string('score', 'log_prob', 'log_prob | logit.')
_STEPS = flags.DEFINE_integer('steps', 64, 'Integrated-gradients intervals / PGD steps.')
_BASELINE = flags.DEFINE_string('baseline', 'pad', 'Integrated-gradients baseline: pad | zero.')
_EPS = flags.DEFINE_float('eps', 0.01, 'L_inf radius of FGSM / PGD.')
_RANDOM_START = flags.DEFINE_bool('random_start', False, 'PGD from a uniform random point.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the PGD random start.')


def main(argv):
  del argv
  setup_logging()
  initialize_distributed(_DISTRIBUTED)
  from jaxformer.analysis import report
  from jaxformer.train.trainer import Trainer
  report.check_options(_METHOD.value, eps=_EPS.value, steps=_STEPS.value)
  config = with_mesh(load_run_config(_WORKDIR.value, _CONFIG.value), _MESH)
  trainer = Trainer(config, _WORKDIR.value, mode='eval')
  try:
    result = report.analyze_text(
        trainer.model(), trainer.exp.data.task, trainer.tokenizer, _TEXT.value, _METHOD.value,
        _OUT.value, target=_TARGET.value, position=_POSITION.value, eps=_EPS.value,
        steps=_STEPS.value, baseline=_BASELINE.value, score=_SCORE.value,
        random_start=_RANDOM_START.value, seed=_SEED.value)
  finally:
    trainer.close()
  print(f'wrote {_OUT.value} and {result["json"]}')


if __name__ == '__main__':
  run(main)
