"""Prepares a dataset ahead of training: `python -m jaxformer.data NAME [options]`.

  python -m jaxformer.data listops                         # the LRA-sized ListOps
  python -m jaxformer.data synthetic_seq2seq/copy --option num_train=1000 --option max_length=8
  python -m jaxformer.data tiny_shakespeare --data_dir /data/tfds   # needs internet (and TF)

Options are offline-builder overrides (`DataConfig.builder_config`), values parsed as Python
literals. Prints where the data lives and the split sizes.
"""

import argparse
import ast

from jaxformer.data import DataConfig, prepare


def _option(text: str):
  key, sep, value = text.partition('=')
  if not sep:
    raise argparse.ArgumentTypeError(f'{text!r}: expected KEY=VALUE')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m jaxformer.data', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('name')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--option', type=_option, action='append', default=[])
  args = parser.parse_args(argv)
  cfg = DataConfig(name=args.name, data_dir=args.data_dir, builder_config=dict(args.option))
  b = prepare(cfg)
  print(b.data_dir)
  for split, info in sorted(b.info.splits.items()):
    print(f'  {split}: {info.num_examples} examples')


if __name__ == '__main__':
  main()
