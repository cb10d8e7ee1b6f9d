"""The kind -> file table in attention/registry.py's docstring is the registry's truth, so a
reader finds any attention variant in two steps."""

import re

import jaxformer.attention  # noqa: F401  (registers every kind)
from jaxformer.attention import registry


def _table() -> dict[tuple[str, str], str]:
  doc = registry.__doc__
  body = doc[doc.index('kind                 impl -> file'):doc.index('New kinds plug in')]
  rows, kinds = {}, []
  for line in body.splitlines()[1:]:
    if not line.strip():
      continue
    if not line.startswith(' ' * 25):  # a new row: its kinds, then impl -> file pairs
      head, rest = line.strip().split('  ', 1) if '  ' in line.strip() else (line.strip(), '')
      kinds = [k.strip() for k in head.split(',')]
    else:
      rest = line
    for impls, file in re.findall(r'([\w /]+?) -> (\w+\.py)', rest):
      for impl in impls.split('/'):
        for kind in kinds:
          rows[(kind, impl.strip())] = file
  return rows


def test_the_docstring_table_lists_every_registered_kind_and_impl_with_its_file():
  actual = {key: cls.__module__.rsplit('.', 1)[-1] + '.py'
            for key, cls in registry._REGISTRY.items()}  # pylint: disable=protected-access
  assert _table() == actual
