"""Rules, presets and meshes from config; bad meshes fail before compilation naming the axis, its
size and the dimension it cannot divide (issue 10 acceptance)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P
from parallel_helpers import LLAMA, experiment, program

from jaxformer.config import ConfigError
from jaxformer.parallel import rules as R
from jaxformer.parallel.config import ParallelConfig, PipelineConfig
from jaxformer.parallel.mesh import make_mesh
from jaxformer.parallel.sharding import Layout


def layout(**parallel) -> Layout:
  cfg = ParallelConfig(**parallel)
  cfg.validate()
  return Layout(make_mesh(cfg), cfg.logical_rules())


def test_presets_map_logical_names_to_the_textbook_layouts():
  dp = R.preset_rules('dp')
  assert dp[R.BATCH] == ('data',) and dp['embed'] == () and dp['mlp'] == ()
  fsdp = R.preset_rules('fsdp')
  assert fsdp[R.BATCH] == ('data', 'fsdp') and fsdp['embed'] == ('fsdp',)
  assert fsdp[R.EMBED] == ()  # activations keep their model dimension whole
  tp = R.preset_rules('tp', sequence_parallel=True)
  for name in ('heads', 'kv_heads', 'mlp', 'vocab', R.HEADS, R.MLP, R.VOCAB):
    assert tp[name] == ('tensor',)
  assert tp[R.NORM_LENGTH] == ('tensor',) and tp[R.LENGTH] == ()
  assert R.preset_rules('tp')[R.NORM_LENGTH] == ()


def test_specs_of_megatron_projections_and_fsdp():
  lay = layout(mesh={'fsdp': 4, 'tensor': 2})
  assert lay.spec(('embed', 'heads', 'head_dim')) == P('fsdp', 'tensor', None)  # column-parallel
  assert lay.spec(('heads', 'head_dim', 'embed')) == P('tensor', None, 'fsdp')  # row-parallel
  assert lay.spec(('embed', 'mlp')) == P('fsdp', 'tensor')
  assert lay.spec(('vocab', 'embed')) == P('tensor', 'fsdp')  # vocab-parallel embedding
  assert lay.spec(R.RESIDUAL) == P('fsdp', None, None)
  assert lay.batch_sharding().spec == P('fsdp')
  # Axes of size 1 shard nothing and are left out.
  assert layout(mesh={'data': 8}).spec(('embed', 'mlp')) == P(None, None)


def test_rule_overrides_and_their_command_line_forms():
  rules = R.Rules.from_config('dp_fsdp_tp', {'embed': 'none', 'activation_batch': 'data,fsdp',
                                             'mlp': R.FROM_PRESET, 'vocab': ['fsdp']})
  assert rules['embed'] == () and rules[R.BATCH] == ('data', 'fsdp')
  assert rules['mlp'] == ('tensor',) and rules['vocab'] == ('fsdp',)


def test_two_dimensions_of_one_array_on_one_mesh_axis_are_refused_not_dropped():
  with pytest.raises(ConfigError, match=r"onto mesh axis 'fsdp'.*activation_batch.*"
                                        r"activation_embed"):
    ParallelConfig(rules={'activation_embed': 'fsdp'}).validate()
  rules = R.Rules.from_config('dp_fsdp_tp', {'mlp': 'fsdp'})
  with pytest.raises(ConfigError, match=r"two dimensions of w .* 'fsdp'.*'embed'.*'mlp'"):
    rules.spec(('embed', 'mlp'), what='w')


@pytest.mark.parametrize('parallel,pattern', [
    (dict(preset='zero3'), r"parallel.preset='zero3' is invalid: allowed values are "
                           r"\['dp', 'dp_fsdp_tp', 'fsdp', 'fsdp_tp', 'tp'\]"),
    (dict(rules={'mlp': 'model'}), r"parallel.rules.mlp='model' is invalid: names mesh axes "
                                   r"\['model'\] that do not exist"),
    (dict(rules={'ffn': 'tensor'}), r"parallel.rules.ffn is invalid: 'ffn' is not a logical"),
    (dict(mesh={'model': 2}), r"parallel.mesh: unknown mesh axes \['model'\]"),
    (dict(mesh={'data': -1, 'fsdp': -1}), r'at most one axis may be -1'),
    (dict(mesh={'fsdp': 0}), r'parallel.mesh.fsdp=0 is invalid'),
    (dict(pipeline=PipelineConfig(repeats=0)), r'parallel.pipeline.repeats=0 is invalid'),
    (dict(preset='dp', mesh={'tensor': 2}), r"parallel.mesh.tensor=2 is invalid: asks for "
                                            r"'tensor' parallelism.*preset='dp'"),
    (dict(preset='fsdp', sequence_parallel=True), r'parallel.sequence_parallel=True'),
])
def test_bad_parallel_configs_name_the_field(parallel, pattern):
  with pytest.raises(ConfigError, match=pattern):
    ParallelConfig(**parallel).validate()


def test_device_count_mismatch_names_the_mesh_and_the_count():
  cfg = ParallelConfig(mesh={'data': 3})
  with pytest.raises(ConfigError, match=r"parallel.mesh=\{'data': 3\}.*needs 3 devices.*8 are "
                                        r'available'):
    cfg.mesh_shape(8)
  with pytest.raises(ConfigError, match=r'fixed axes multiply to 3.*8 devices'):
    ParallelConfig(mesh={'fsdp': -1, 'tensor': 3}).mesh_shape(8)
  assert ParallelConfig(mesh={'fsdp': -1, 'tensor': 2}).mesh_shape(8) == {
      'data': 1, 'stage': 1, 'fsdp': 4, 'context': 1, 'expert': 1, 'tensor': 2}


def test_dcn_mesh_multiplies_the_slice_mesh():
  cfg = ParallelConfig(mesh={'fsdp': -1}, dcn_mesh={'data': 2})
  assert cfg.mesh_shape(8)['data'] == 2 and cfg.mesh_shape(8)['fsdp'] == 4
  # One process and no TPU slices: there is nothing to put across the network.
  # (tests/parallel/test_multihost.py builds this mesh from two processes.)
  with pytest.raises(ConfigError, match=r'parallel.dcn_mesh=.*asks for 2 processes .* the '
                                        r'devices come from 1'):
    make_mesh(cfg)


@pytest.mark.parametrize('model,parallel,pattern', [
    (dict(attention=dict(num_heads=4, num_kv_heads=2, head_dim=16)), {'tensor': 8},
     r"tensor=8 cannot divide the heads dimension of the activations \(size 4"),
    (dict(attention=dict(num_heads=16, num_kv_heads=2, head_dim=8)), {'tensor': 4},
     r"tensor=4 cannot divide the kv_heads dimension .*size 2"),
    (dict(ffn=dict(hidden_dim=100)), {'tensor': 8},
     r"tensor=8 cannot divide the mlp dimension .*size 100"),
    (dict(d_model=60, attention=dict(num_heads=16, num_kv_heads=8, head_dim=8)), {'fsdp': 8},
     r"fsdp=8 cannot divide dimension \d \('embed', size 60\) of parameter"),
])
def test_a_mesh_axis_that_does_not_divide_a_model_dimension_is_refused(model, parallel,
                                                                        pattern):
  cfg = dict(LLAMA, **model)
  with pytest.raises(ConfigError, match=pattern):
    program(experiment('llama', cfg, parallel=dict(mesh=parallel)))


def test_batch_not_divisible_by_the_batch_axes_is_refused(tmp_path):
  from jaxformer.train.experiment import default_config
  from jaxformer.train.trainer import Trainer
  from jaxformer.models import family_dict
  cfg = default_config(model=family_dict('llama', **LLAMA),
                       data=dict(name='python_stdlib', task='lm', seq_len=16),
                       train=dict(batch_size=12), parallel=dict(mesh={'fsdp': 8}))
  with pytest.raises(ConfigError, match=r"train.batch_size=12 is invalid: gives micro-batches of "
                                        r"12 examples, which do not split over the 8 devices of "
                                        r"the batch mesh axes \('fsdp',\)"):
    Trainer(cfg, str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'config.json').exists()


def test_errors_come_before_any_compilation(tmp_path, monkeypatch):
  compiled = []
  original = jax.jit

  def counting_jit(*args, **kwargs):
    compiled.append(args)
    return original(*args, **kwargs)

  monkeypatch.setattr(jax, 'jit', counting_jit)
  with pytest.raises(ConfigError):
    program(experiment('llama', dict(LLAMA, ffn=dict(hidden_dim=100)),
                       parallel=dict(mesh={'tensor': 8})))
  assert not compiled


@pytest.mark.parametrize('layout,mesh,preset,sp', [
    ('pp2_fsdp2_tp2', {'stage': 2, 'fsdp': 2, 'tensor': 2}, 'fsdp_tp', False),
    ('cp4_dp2', {'context': 4, 'data': 2}, 'dp', False),
    ('ep2_fsdp2_tp2', {'expert': 2, 'fsdp': 2, 'tensor': 2}, 'fsdp_tp', False),
    ('pp2_dp4', {'stage': 2, 'data': 4}, 'dp', False),
    ('fsdp4_tp2_sp', {'fsdp': 4, 'tensor': 2}, 'fsdp_tp', True),
    ('dp2_fsdp2_tp2', {'data': 2, 'fsdp': 2, 'tensor': 2}, 'dp_fsdp_tp', False),
    ('fsdp8', {'fsdp': 8}, 'fsdp', False),
    ('tp8', {'tensor': 8}, 'tp', False),
])
def test_a_named_layout_is_the_mesh_and_preset_it_names(layout, mesh, preset, sp):
  """`parallel.layout` is one switch for mesh, preset and sequence parallelism."""
  named = ParallelConfig(layout=layout, mesh={'data': 8}, preset='dp')  # layout wins
  named.validate()
  explicit = ParallelConfig(preset=preset, mesh=dict({'data': 1}, **mesh), sequence_parallel=sp)
  assert named.mesh_shape(8) == explicit.mesh_shape(8)
  assert named.logical_rules() == explicit.logical_rules()
  assert named.preset == preset and named.sequence_parallel == sp


@pytest.mark.parametrize('layout,pattern', [
    ('pp2_xx4', r"parallel.layout='pp2_xx4' is invalid: has the token 'xx4'"),
    ('pp2_pp4', r"names 'pp' twice"),
    ('tp', r"has the token 'tp'"),
])
def test_bad_layouts_name_the_field_and_the_grammar(layout, pattern):
  with pytest.raises(ConfigError, match=pattern):
    ParallelConfig(layout=layout)


def test_a_layout_that_does_not_fit_the_devices_names_the_layout():
  with pytest.raises(ConfigError, match=r"parallel.layout='pp2_dp2' is invalid: needs 4 devices"):
    ParallelConfig(layout='pp2_dp2').mesh_shape(8)
