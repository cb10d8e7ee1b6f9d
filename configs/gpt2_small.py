"""GPT-2 small (Radford et al. 2019) as a byte-level language model of Python source.

    python -m jaxformer.train --config=configs/gpt2_small.py --workdir=runs/gpt2_small
    python -m jaxformer.train --config=configs/gpt2_small.py:size=tiny --workdir=runs/gpt2_tiny

Presets (`:size=`):
  small  the paper's 124M shape: 12 layers, d=768, 12 heads, 1024 context, learned positions,
         pre-LN, tanh GELU, dropout 0.1, tied head. One GPU / TPU host (32 x 1024 bytes a step).
  tiny   2 layers, d=32; a CPU in seconds (tests/test_configs.py runs it).
Vocabulary: the offline python_stdlib corpus is read byte-level (260 ids: 256 bytes + pad, bos,
eos, mask), not GPT-2's 50257-piece BPE, which needs a download; the body is GPT-2 small's
(85M parameters outside the embeddings). A SentencePiece vocabulary trained on the corpus is
`--config.data.tokenizer=spm --config.data.spm_vocab_size=8000 --config.model.vocab_size=8000`.
Optimizer: AdamW, betas (0.9, 0.95), weight decay 0.1, peak lr 6e-4 with warmup then cosine
decay to 10% (the GPT-3 paper's 125M recipe; GPT-2's own was not published), clip 1.0.
The corpus has about 10.6M training bytes, so 2000 steps are about 6 passes: the model will
start to overfit, which the validation loss shows. Expected result: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, lm_sample, stdlib_bytes, warmup_adamw

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, seq=64, batch=8, steps=2, dropout=0.0),
    'small': dict(d=768, layers=12, heads=12, seq=1024, batch=32, steps=2000, dropout=0.1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  s = SIZES[opts['size']]
  model = family_dict(
      'gpt2', vocab_size=260, d_model=s['d'], num_layers=s['layers'], max_length=s['seq'],
      attention=dict(num_heads=s['heads'], dropout=s['dropout']), ffn=dict(hidden_dim=4 * s['d']),
      position=dict(max_length=s['seq']), embed_dropout=s['dropout'],
      residual_dropout=s['dropout'])
  data = stdlib_bytes('lm', seq_len=s['seq'])
  optim = warmup_adamw(6e-4, s['steps'], b2=0.95, weight_decay=0.1, end_lr_ratio=0.1)
  train = cadence(s['batch'], s['steps'], **lm_sample(opts['size']))
  return default_config(model=model, data=data, optim=optim, train=train)
