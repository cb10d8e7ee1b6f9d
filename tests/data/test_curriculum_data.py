"""Sequence-length curriculum data (jaxformer/data/curriculum.py): each stage's batches have its
shape, a stage continues the example stream where the previous one stopped, and the saved
position resumes exactly before, on and after a stage boundary."""

import json

import numpy as np
import pytest

from jaxformer.data import make_pipeline
from jaxformer.data.curriculum import Curriculum, make_curriculum_pipeline
from jaxformer.data.pipeline import DataStateError
from jaxformer.data.shards import make_process_pipeline

# Short documents (copy-task pairs), so that a stage of a few rows finishes several of them.
NAME = 'synthetic_seq2seq/copy'
SPEC = ((0, 16, 4), (2, 32, 2))
SEED = 0  # stage 0's last row holds a document end: a resume point inside it would show


@pytest.fixture(scope='module')
def cfg(make_cfg, splits):
  return make_cfg(name=NAME, task='lm', seq_len=32, builder_config=splits)


def stream(batches):
  """The tokens of the rows, in order (padding left out)."""
  return np.concatenate([b['targets'][b['segment_ids'] > 0] for b in batches])


def open_curriculum(cfg, spec=SPEC, **kwargs):
  cur = Curriculum.from_spec(spec, seq_len=cfg.seq_len, batch_size=2)
  return make_curriculum_pipeline(cfg, cur, 'train', seed=SEED, process_index=0, process_count=1,
                                  **kwargs)


def test_stages_have_their_shapes_and_continue_the_example_stream(cfg):
  it = open_curriculum(cfg)
  batches = [next(it) for _ in range(5)]
  it.close()
  assert [b['inputs'].shape for b in batches] == [(4, 16)] * 2 + [(2, 32)] * 3
  # The oracle: one plain pipeline's rows, whose tokens are the documents in stream order.
  ref = make_pipeline(cfg, 'train', batch_size=4, seq_len=16, seed=SEED)
  whole = stream([next(ref) for _ in range(12)])
  ref.close()
  first, second = stream(batches[:2]), stream(batches[2:])
  np.testing.assert_array_equal(first, whole[:len(first)])  # stage 0 is the plain pipeline
  # Stage 1 starts at the first document of stage 0's last row (the documents that row was cut
  # from are read again whole), and goes on from there with none skipped.
  eos = np.flatnonzero(first[:len(first) - 16] == it.tokenizer.eos_id)
  resume = eos[-1] + 1 if len(eos) else 0
  assert resume > 0  # stage 0 finished documents before its last row
  assert (first[-16:] == it.tokenizer.eos_id).any()  # and one inside it, read again
  np.testing.assert_array_equal(second, whole[resume:resume + len(second)])


@pytest.mark.parametrize('saved_after', [1, 2, 3])  # mid stage 0, on the boundary, mid stage 1
def test_the_saved_position_resumes_exactly(cfg, saved_after):
  cfg = cfg.replace(num_shards=2)  # each shard keeps its own place in its own stream
  it = open_curriculum(cfg)
  for _ in range(saved_after):
    next(it)
  states = {j: json.dumps(json.loads(s)).encode() for j, s in it.shard_states().items()}
  expected = [next(it) for _ in range(4 - saved_after)]
  it.close()
  fresh = open_curriculum(cfg)
  fresh.set_shard_states(states)
  assert fresh.step == saved_after
  for want in expected:
    got = next(fresh)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  fresh.close()


def test_a_position_from_another_curriculum_or_none_is_refused(cfg):
  it = open_curriculum(cfg)
  for _ in range(3):
    next(it)
  states = it.shard_states()
  it.close()
  # Stages after the saved one may change; the saved one may not.
  later = open_curriculum(cfg, ((0, 16, 4), (2, 32, 2), (9, 32, 4)))
  later.set_shard_states(states)
  later.close()
  for spec, match in [(((0, 16, 4), (2, 32, 4)), r'stage 1 .*\(2, 32, 2\).*\(2, 32, 4\)'),
                      (((0, 16, 4), (4, 32, 2)), 'saved at step 3 in curriculum stage 1'),
                      (((0, 32, 2),), 'no such stage')]:
    other = open_curriculum(cfg, spec)
    with pytest.raises(DataStateError, match=match):
      other.set_shard_states(states)
    other.close()
  plain = make_process_pipeline(cfg, 'train', batch_size=2, seed=SEED, process_index=0,
                                process_count=1)
  with pytest.raises(DataStateError, match='train.curriculum'):
    plain.set_shard_states(states)
  fresh = open_curriculum(cfg)
  with pytest.raises(DataStateError, match='without a sequence-length curriculum'):
    fresh.set_shard_states(plain.shard_states())
  plain.close()
  fresh.close()

