"""Data: offline TFDS builders (ArrayRecord, no TensorFlow), tokenizers, Grain pipelines.

    from jaxformer.data import DataConfig, make_pipeline
    cfg = DataConfig.from_dict({'name': 'python_stdlib', 'task': 'lm', 'seq_len': 256})
    it = make_pipeline(cfg, 'train', batch_size=8, seed=0,
                       shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it)          # dict of numpy arrays; schema in jaxformer.data.pipeline
    state = it.get_state()    # bytes; it.set_state(state) resumes exactly

Importing this package registers the offline builders with TFDS ('python_stdlib',
'synthetic_seq2seq', 'mqar', 'listops'); `python -m jaxformer.data NAME` prepares one ahead.
"""

from jaxformer.data.builders import BUILDERS
from jaxformer.data.config import DataConfig
from jaxformer.data.pipeline import DataIterator
from jaxformer.data.pipeline import make_pipeline
from jaxformer.data.pipeline import make_tokenizer
from jaxformer.data.sources import DataUnavailableError
from jaxformer.data.sources import builder as prepare
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.data.tokenizers import SentencePieceTokenizer
from jaxformer.data.tokenizers import Tokenizer
from jaxformer.data.tokenizers import VocabTokenizer

__all__ = [
    'BUILDERS', 'ByteTokenizer', 'DataConfig', 'DataIterator', 'DataUnavailableError',
    'SentencePieceTokenizer', 'Tokenizer', 'VocabTokenizer', 'make_pipeline', 'make_tokenizer',
    'prepare',
]
