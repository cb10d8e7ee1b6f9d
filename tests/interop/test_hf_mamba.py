"""Hugging Face MambaForCausalLM parity (CATALOG D10): tiny random HF Mamba models (built locally;
HF's PyTorch path runs on CPU) converted with `from_hf` give the same fp32 logits within 1e-4 max
abs in several shapes, exported state dicts load strictly back into HF, and greedy generation is
token-identical to HF `generate` for 24 tokens."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from jaxformer.inference import generate
from jaxformer.interop.hf import from_hf, to_hf_config, to_hf_state_dict

ATOL = 1e-4


def hf_mamba(seed=0, spread=0.1, **kw):
  """Every parameter perturbed after HF's init (A_log, D, dt bias, norms included), so none
  keeps a trivial value."""
  torch.manual_seed(seed)
  config = T.MambaConfig(bos_token_id=None, eos_token_id=None, pad_token_id=0, **kw)
  model = T.MambaForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(spread * torch.randn_like(p))
  return model.eval()


SHAPES = {
    # HF defaults in small: N=16, W=4, expand 2, dt rank ceil(D/16), conv bias, tied head.
    'default': (dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=16), {}),
    # Biased projections, no conv bias, explicit dt rank, width 3, expand 3, untied, unrolled.
    'biased_untied': (dict(vocab_size=61, hidden_size=24, num_hidden_layers=3, state_size=4,
                           conv_kernel=3, expand=3, time_step_rank=5, use_bias=True,
                           use_conv_bias=False, tie_word_embeddings=False,
                           layer_norm_epsilon=1e-3), dict(scan_layers=False)),
    # One layer, width 2, a wide state.
    'narrow_conv': (dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=32,
                         conv_kernel=2), {}),
}


@pytest.mark.parametrize('name', [
    'default', pytest.param('biased_untied', marks=pytest.mark.slow),
    pytest.param('narrow_conv', marks=pytest.mark.slow)])
def test_mamba_logits_parity_and_export(name):
  kw, over = SHAPES[name]
  hf = hf_mamba(**kw)
  cfg, model = from_hf(hf, **over)
  assert cfg.family == 'mamba' and cfg.mamba_inner_dim == hf.config.intermediate_size
  tokens = torch.from_numpy(np.random.default_rng(1).integers(0, kw['vocab_size'], (2, 19)))
  with torch.no_grad():
    ref = hf(tokens).logits.numpy()
  ours = np.asarray(model(jnp.asarray(tokens.numpy())).logits)
  assert ours.shape == ref.shape
  err = float(np.max(np.abs(ours - ref)))
  assert err <= ATOL, f'max abs error {err:.3g} > {ATOL}'
  assert float(np.std(ref)) > 0.1  # logits that differ between tokens, not a flat output

  sd = to_hf_state_dict(model, cfg)
  ref_sd = hf.state_dict()
  assert set(sd) == set(ref_sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(v, ref_sd[k].numpy(), err_msg=k)
  fresh = T.MambaForCausalLM(to_hf_config(cfg)).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(fresh(tokens).logits.numpy(), ref, atol=1e-6)


def test_greedy_generation_equals_hf_generate():
  """24 greedy tokens for two prompts of different lengths (ours decode them in one left-padded
  batch, HF one at a time) through the prompt prefill and the O(1) recurrent step."""
  new = 24
  hf = hf_mamba(spread=0.3, vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8)
  _, ours = from_hf(hf)
  prompts = [[5, 17, 42, 8, 3, 66, 12], [11, 60]]
  out = np.asarray(generate(ours, prompts, max_new_tokens=new).tokens)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      want = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, num_beams=1, eos_token_id=None,
                         pad_token_id=0)[0].tolist()[len(prompt):]
    assert len(set(want)) > 3, 'degenerate reference: spread the weights more'
    assert out[row].tolist() == want, (row, out[row].tolist(), want)
