"""Inference: sampling rules, KV-cached generation loops and beam search (CATALOG G)."""

from jaxformer.inference.beam import BeamOutput, beam_search, beam_search_seq2seq
from jaxformer.inference.decode import GenerateOutput, generate, generate_seq2seq
from jaxformer.inference.sampling import (filter_logits, greedy, sample, top_k_filter,
                                          top_p_filter)

__all__ = ['BeamOutput', 'GenerateOutput', 'beam_search', 'beam_search_seq2seq',
           'filter_logits', 'generate', 'generate_seq2seq', 'greedy', 'sample', 'top_k_filter',
           'top_p_filter']
