"""Training throughput of one step against peers, same model, same batch (issue 15).

    python experiments/cpu_step_vs_peers.py                      # the quickstart model
    python experiments/cpu_step_vs_peers.py --repeats 3 --steps 5 --systems trainer,jax_ref

The model is the quickstart's (configs/quickstart.py, the README's main command): LLaMA-style,
RMSNorm, RoPE (rotate-half), grouped-query attention with QK-norm (RMSNorm on each head before
RoPE), SwiGLU, tied embeddings, 4 layers, d=128, 4 query / 2 kv heads, FFN 384, vocabulary 260,
batch 8 x 256 tokens, fp32, AdamW. --d-model, --layers, --batch and --seq change the shapes
(the FFN stays 3 d, the heads 4 / 2). Systems, each one optimizer step on one fixed batch:

  trainer        jaxformer's compiled train step as the trainer runs it:
                 `TrainProgram(exp, layout).train_step` on `init_state()`, with the quickstart's
                 optimizer (clipping, warmup-cosine schedule, decay mask, non-finite skipping),
                 gradient-accumulation scan and metrics. The CLI's loop around it (data pipeline,
                 logging, checkpoints) is not included.
  bare           jaxformer's model in a minimal jitted step: nnx.split/merge, value_and_grad of a
                 plain cross-entropy, clip + optax.adamw, no metrics, no scan.
  jax_ref        a hand-written JAX model of the same architecture (`reference_forward`), params
                 in a dict, the layers in a Python loop (unrolled at trace), clip + optax.adamw.
  torch_eager    Hugging Face `Qwen3ForCausalLM` in PyTorch eager (SDPA attention): Qwen3 is the
                 LLaMA architecture plus per-head QK-norm before RoPE, i.e. exactly this model
                 (HF Llama has no QK-norm); torch.optim.AdamW + clip_grad_norm_.
  torch_compile  the same with `torch.compile(model)` (inductor; the optimizer stays eager). Not
                 in the default --systems: its warm-up (compile) takes about a minute on the
                 2-core machine.

bare, jax_ref and the torch systems share the optimizer hyper-parameters (lr, betas, eps, weight
decay on every parameter, clip norm) at a constant learning rate. Every system starts from the
same weights (jaxformer's initialisation, copied into the others), so their step-0 losses agree
(`loss_step0` in the CSV), and bare, jax_ref and torch still agree after some updates
(`loss_last`); tests/test_experiments.py checks both to 1e-4, and the logits on random weights.

Timing: every system is built and warmed up (2 steps, which compile) first; then --repeats
rounds, each timing --steps steps of every system in turn (alternating, so that drift of a
shared machine hits every system alike). A step ends when its updated parameters exist
(`block_until_ready`; torch is synchronous on CPU, its loss is read with `.item()`).
tokens/s = steps * batch * seq / seconds. Reported per system: the median, min and max over
rounds, and the ratio to `trainer`: the median of per-round ratios, with their min and max.

Threads: XLA:CPU runs one intra-op thread per core by default and torch.set_num_threads is set
to the same count, so both use the same cores. On a machine shared with other jobs, give both
one thread (torch's OpenMP threads wait for each other at every op, and with a core taken by
another job that cost it 10x in docs/benchmarks.md):

    XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' \
        python experiments/cpu_step_vs_peers.py --torch-threads 1

Allocator: the script imports jaxformer, which on CPU sets glibc's mallopt for the whole process
(jaxformer/cpu_allocator.py), so every system, PyTorch included, runs under it; run with
JAXFORMER_CPU_ALLOCATOR=system for glibc's defaults (docs/benchmarks.md has both).

Writes the CSV (FIELDS) to --out, a bar chart with min-max error bars next to it (.png), and
prints a markdown table. Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import jaxformer  # noqa: F401  (CPU allocator and miscompile guard, before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxformer.models import build_model
from jaxformer.train.experiment import Experiment, load_config
from jaxformer.train.program import TrainProgram
from jaxformer.train.trainer import make_layout

import benchlib  # experiments/benchlib.py, next to this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'quickstart.py')
SYSTEMS = ('trainer', 'bare', 'jax_ref', 'torch_eager', 'torch_compile')
DEFAULT_SYSTEMS = 'trainer,bare,jax_ref,torch_eager'
FIELDS = ('system', 'status', 'tokens_per_s_median', 'tokens_per_s_min', 'tokens_per_s_max',
          'ratio_to_trainer', 'ratio_min', 'ratio_max', 'loss_step0', 'loss_last', 'backend',
          'device', 'threads')
WARMUP_STEPS = 2


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--systems', default=DEFAULT_SYSTEMS, help=f'any of {",".join(SYSTEMS)}')
  p.add_argument('--repeats', type=int, default=5, help='alternating rounds')
  p.add_argument('--steps', type=int, default=10, help='timed steps per system per round')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--d-model', type=int, default=128)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--torch-threads', type=int, default=0,
                 help='torch.set_num_threads (default 0: one per core, as XLA:CPU)')
  p.add_argument('--out', default='experiments/results/cpu_step_vs_peers.csv')
  args = p.parse_args(argv)
  unknown = sorted(set(args.systems.split(',')) - set(SYSTEMS))
  if unknown:
    p.error(f'--systems: unknown {unknown}; allowed values are {list(SYSTEMS)}')
  return args


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def jax_threads() -> int:
  """XLA:CPU's threads: one per core, or 1 when XLA_FLAGS turns its Eigen pool off
  (`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`)."""
  return 1 if '--xla_cpu_multi_thread_eigen=false' in os.environ.get('XLA_FLAGS', '') else cores()


# ------------------------------------------------------------------ shared model and batch
def experiment(args) -> Experiment:
  """The quickstart experiment at the requested shapes."""
  c = load_config(CONFIG)
  c.model.d_model, c.model.num_layers, c.model.max_length = args.d_model, args.layers, args.seq
  c.model.ffn.hidden_dim = 3 * args.d_model
  c.data.seq_len, c.train.batch_size = args.seq, args.batch
  return Experiment.from_config(c)


def make_batch(exp: Experiment) -> dict[str, np.ndarray]:
  """A fixed 'lm' batch (the schema of jaxformer.data): one segment per row, every target counts."""
  b, t = exp.train.batch_size, exp.data.seq_len
  tokens = np.random.default_rng(0).integers(0, exp.model.vocab_size, (b, t + 1), np.int32)
  ones = np.ones((b, t), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
              positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
              loss_mask=ones)


def hyper(exp: Experiment) -> dict:
  o = exp.optim
  return dict(lr=o.lr, b1=o.b1, b2=o.b2 if o.b2 is not None else 0.999,
              eps=o.eps if o.eps is not None else 1e-8, weight_decay=o.weight_decay,
              clip=o.grad_clip_norm)


def optax_tx(h: dict) -> optax.GradientTransformation:
  adamw = optax.adamw(h['lr'], b1=h['b1'], b2=h['b2'], eps=h['eps'],
                      weight_decay=h['weight_decay'])
  return optax.chain(optax.clip_by_global_norm(h['clip']), adamw) if h['clip'] else adamw


def reference_weights(params) -> dict:
  """jaxformer's (layer-stacked) parameters as the plain dict `reference_forward` reads."""
  p = nnx.to_pure_dict(params)
  blocks = p['stack']['layers']['blocks'][0]
  a = blocks['self_attn']
  layers = [dict(attn_norm=blocks['attn_sub']['norm']['scale'][i], wq=a['wq'][i],
                 wk=a['wk'][i], wv=a['wv'][i], wo=a['wo'][i], q_norm=a['q_norm']['scale'][i],
                 k_norm=a['k_norm']['scale'][i], ffn_norm=blocks['ffn_sub']['norm']['scale'][i],
                 w_gate=blocks['ffn']['wi_gate'][i], w_up=blocks['ffn']['wi_up'][i],
                 w_down=blocks['ffn']['wo'][i])
            for i in range(a['wq'].shape[0])]
  return dict(embed=p['embedder']['embed']['embedding'], final_norm=p['final_norm']['scale'],
              layers=layers)


# ------------------------------------------------------------------ systems
def build_trainer(exp, batch, weights, h):
  del weights, h  # the trainer makes its own state (same seed, so the same weights)
  program = TrainProgram(exp, make_layout(exp.parallel, jax.devices()[:1]))
  box = {'state': program.init_state()}
  dev_batch = jax.device_put(batch, program.batch_sharding)

  def step():
    box['state'], metrics = program.train_step(box['state'], dev_batch)
    jax.block_until_ready(box['state'])
    return float(metrics['total_loss'])

  return step


def build_bare(exp, batch, weights, h):
  del weights  # built by jaxformer from the same seed
  graphdef, params, rest = nnx.split(build_model(exp.model, seed=exp.train.seed), nnx.Param, ...)
  tx = optax_tx(h)

  def loss_fn(params, inputs, targets):
    logits = nnx.merge(graphdef, params, rest, copy=True)(inputs).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return _jax_loop(jax.jit(train_step, donate_argnums=(0, 1)), params, tx.init(params), batch)


def _jax_loop(train_step, params, opt_state, batch):
  box = {'params': params, 'opt': opt_state}
  inputs, targets = jnp.asarray(batch['inputs']), jnp.asarray(batch['targets'])

  def step():
    box['params'], box['opt'], loss = train_step(box['params'], box['opt'], inputs, targets)
    jax.block_until_ready(box['params'])
    return float(loss)

  return step


def _rms(x, scale, eps):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * scale


def _rope(x, theta):
  """x [B, T, N, H] rotated by positions 0..T-1, the rotate-half layout."""
  t, hd = x.shape[1], x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  angles = np.arange(t)[:, None] * inv[None]
  angles = jnp.asarray(np.concatenate([angles, angles], -1), jnp.float32)[None, :, None]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * jnp.cos(angles) + jnp.concatenate([-x2, x1], -1) * jnp.sin(angles)


def reference_forward(w: dict, tokens, *, eps: float, theta: float):
  """Logits [B, T, V] of the hand-written model: pre-norm blocks
  x += Wo attn(rope(qnorm(x Wq)), rope(knorm(x Wk)), x Wv); x += W_down(silu(x W_g) * x W_u),
  causal softmax(q k / sqrt(H)) with query head n reading kv head n // (N / K), tied head."""
  x = w['embed'][tokens]
  t = tokens.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  for l in w['layers']:
    hx = _rms(x, l['attn_norm'], eps)
    q = _rope(_rms(jnp.einsum('BTD,DNH->BTNH', hx, l['wq']), l['q_norm'], eps), theta)
    k = _rope(_rms(jnp.einsum('BTD,DKH->BTKH', hx, l['wk']), l['k_norm'], eps), theta)
    v = jnp.einsum('BTD,DKH->BTKH', hx, l['wv'])
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum('BTNH,BSNH->BNTS', q, k) * q.shape[-1] ** -0.5
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    x = x + jnp.einsum('BTNH,NHD->BTD', jnp.einsum('BNTS,BSNH->BTNH', p, v), l['wo'])
    hx = _rms(x, l['ffn_norm'], eps)
    x = x + (jax.nn.silu(hx @ l['w_gate']) * (hx @ l['w_up'])) @ l['w_down']
  return _rms(x, w['final_norm'], eps) @ w['embed'].T


def build_jax_ref(exp, batch, weights, h):
  m, tx = exp.model, optax_tx(h)
  params = jax.tree.map(jnp.array, weights)  # copies: the step donates them

  def train_step(params, opt_state, inputs, targets):
    def loss_fn(params):
      logits = reference_forward(params, inputs, eps=m.norm_eps, theta=m.position.rope_theta)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return _jax_loop(jax.jit(train_step, donate_argnums=(0, 1)), params, tx.init(params), batch)


def torch_model(exp, weights):
  """Hugging Face Qwen3ForCausalLM with the shapes of `exp.model` and `weights` copied in."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen3Config, Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  m = exp.model
  cfg = Qwen3Config(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden_dim,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, rms_norm_eps=m.norm_eps,
      max_position_embeddings=m.max_length, tie_word_embeddings=True, attention_bias=False,
      use_sliding_window=False, attention_dropout=0.0,
      rope_parameters={'rope_type': 'default', 'rope_theta': m.position.rope_theta})
  model = Qwen3ForCausalLM(cfg)
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
  flat = lambda a: np.asarray(a).reshape(a.shape[0], -1).T  # [D, N, H] -> [N H, D]  # noqa: E731
  sd = {'model.embed_tokens.weight': t(weights['embed']),
        'model.norm.weight': t(weights['final_norm'])}
  for i, l in enumerate(weights['layers']):
    pre = f'model.layers.{i}.'
    sd.update({
        pre + 'input_layernorm.weight': t(l['attn_norm']),
        pre + 'post_attention_layernorm.weight': t(l['ffn_norm']),
        pre + 'self_attn.q_proj.weight': t(flat(l['wq'])),
        pre + 'self_attn.k_proj.weight': t(flat(l['wk'])),
        pre + 'self_attn.v_proj.weight': t(flat(l['wv'])),
        pre + 'self_attn.o_proj.weight': t(np.asarray(l['wo']).reshape(-1, m.d_model).T),
        pre + 'self_attn.q_norm.weight': t(l['q_norm']),
        pre + 'self_attn.k_norm.weight': t(l['k_norm']),
        pre + 'mlp.gate_proj.weight': t(np.asarray(l['w_gate']).T),
        pre + 'mlp.up_proj.weight': t(np.asarray(l['w_up']).T),
        pre + 'mlp.down_proj.weight': t(np.asarray(l['w_down']).T)})
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if k != 'lm_head.weight']  # tied to the embedding
  if missing or unexpected:
    raise ValueError(f'torch weights: missing {missing}, unexpected {unexpected}')
  return model.train()


def build_torch(exp, batch, weights, h, *, compile_model: bool = False):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(h['torch_threads'] or cores())
  model = torch_model(exp, weights)
  opt = torch.optim.AdamW(model.parameters(), lr=h['lr'], betas=(h['b1'], h['b2']),
                          eps=h['eps'], weight_decay=h['weight_decay'])
  forward = torch.compile(model) if compile_model else model
  inputs = torch.from_numpy(batch['inputs']).long()
  targets = torch.from_numpy(batch['targets']).long().reshape(-1)

  def step():
    opt.zero_grad(set_to_none=True)
    logits = forward(input_ids=inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    loss.backward()
    if h['clip']:
      torch.nn.utils.clip_grad_norm_(model.parameters(), h['clip'])
    opt.step()
    return loss.item()

  return step


BUILDERS = {
    'trainer': build_trainer, 'bare': build_bare, 'jax_ref': build_jax_ref,
    'torch_eager': build_torch,
    'torch_compile': lambda *a: build_torch(*a, compile_model=True),
}


def torch_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'transformers'))


# ------------------------------------------------------------------ measurement and outputs
def build_all(systems, args) -> tuple[dict, dict, dict]:
  """-> (step callables, step-0 losses, failed systems' statuses), every system warmed up."""
  exp = experiment(args)
  batch, h = make_batch(exp), dict(hyper(exp), torch_threads=args.torch_threads)
  weights = reference_weights(nnx.state(build_model(exp.model, seed=exp.train.seed), nnx.Param))
  steps, first, failed = {}, {}, {}
  for name in systems:
    if name.startswith('torch') and not torch_available():
      failed[name] = 'no torch'
      continue
    try:
      t0 = time.perf_counter()
      step = BUILDERS[name](exp, batch, weights, h)
      first[name] = step()
      for _ in range(WARMUP_STEPS - 1):
        step()
      steps[name] = step
      print(f'{name}: built and warmed up in {time.perf_counter() - t0:.1f} s, step-0 loss '
            f'{first[name]:.6f}', flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f'  {name} failed: {type(e).__name__}: {e}', file=sys.stderr)
      failed[name] = 'oom' if benchlib.is_oom(e) else 'error'
  return steps, first, failed


def measure(steps: dict, args) -> tuple[dict, dict]:
  """Alternating rounds -> ({system: [tokens/s per round]}, {system: last loss})."""
  tokens = args.steps * args.batch * args.seq
  tps, last = {name: [] for name in steps}, {}
  for r in range(args.repeats):
    for name, step in steps.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        last[name] = step()
      tps[name].append(tokens / (time.perf_counter() - t0))
    print(f'round {r + 1}/{args.repeats}: ' + ', '.join(
        f'{n} {v[-1]:,.0f}' for n, v in tps.items()) + ' tokens/s', flush=True)
  return tps, last


def make_rows(systems, tps, first, last, failed) -> list[dict]:
  backend, device = jax.default_backend(), jax.devices()[0].device_kind
  base = tps.get('trainer')
  rows = []
  for name in systems:
    torch_sys = name.startswith('torch')
    row = dict({f: '' for f in FIELDS}, system=name, status=failed.get(name, 'ok'),
               backend='torch-cpu' if torch_sys else backend,
               device='cpu' if torch_sys else device, threads=jax_threads())
    if torch_sys and torch_available():
      import torch  # pylint: disable=import-outside-toplevel
      row['threads'] = torch.get_num_threads()
    if name in tps:
      v = tps[name]
      row.update(tokens_per_s_median=statistics.median(v), tokens_per_s_min=min(v),
                 tokens_per_s_max=max(v), loss_step0=first[name], loss_last=last[name])
      if base:
        ratios = [a / b for a, b in zip(v, base)]
        row.update(ratio_to_trainer=statistics.median(ratios), ratio_min=min(ratios),
                   ratio_max=max(ratios))
    rows.append(row)
  return rows


def markdown_table(rows: list[dict]) -> str:
  lines = ['| system | status | tokens/s median (min-max) | ratio to trainer (min-max) | '
           'step-0 loss |', '|---|---|---:|---:|---:|']
  for r in rows:
    if r['status'] != 'ok':
      lines.append(f"| {r['system']} | {r['status']} | | | |")
      continue
    ratio = ('' if r['ratio_to_trainer'] == '' else
             f"{r['ratio_to_trainer']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
    lines.append(f"| {r['system']} | ok | {r['tokens_per_s_median']:,.0f} "
                 f"({r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}) | {ratio} | "
                 f"{r['loss_step0']:.5f} |")
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ok = [r for r in rows if r['status'] == 'ok']
  fig, ax = plt.subplots(figsize=(7, 4))
  med = [r['tokens_per_s_median'] for r in ok]
  err = [[m - r['tokens_per_s_min'] for m, r in zip(med, ok)],
         [r['tokens_per_s_max'] - m for m, r in zip(med, ok)]]
  bars = ax.bar([r['system'] for r in ok], med, yerr=err, capsize=4,
                color=['black' if r['system'] == 'trainer' else 'tab:blue' for r in ok])
  for bar, r in zip(bars, ok):
    if r['ratio_to_trainer'] != '':
      ax.annotate(f"{r['ratio_to_trainer']:.2f}x", (bar.get_x() + bar.get_width() / 2, 0),
                  xytext=(0, 4), textcoords='offset points', ha='center', color='white')
  ax.set_ylabel('tokens / s (median; bars: min-max over rounds)')
  ax.grid(True, axis='y', alpha=0.3)
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  systems = args.systems.split(',')
  steps, first, failed = build_all(systems, args)
  tps, last = measure(steps, args)
  rows = make_rows(systems, tps, first, last, failed)
  benchlib.write_outputs(
      rows, FIELDS, args.out, plot,
      f'one AdamW step, quickstart LLaMA-style model, L={args.layers}, D={args.d_model}, '
      f'B={args.batch} x T={args.seq}, fp32,\n{cores()} cores (threads: jax {jax_threads()}, '
      f'torch {args.torch_threads or cores()}); {args.repeats} alternating rounds of '
      f'{args.steps} steps', markdown_table(rows))
  return rows


if __name__ == '__main__':
  main()
