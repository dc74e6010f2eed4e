"""jaxseq: sequence models in JAX/Flax. Public names are re-exported here; nothing else."""

from jaxseq.attention import KVCache, apply_rope, attention, causal_mask, sinusoidal_positions
from jaxseq.attention_cells import AttentionCell
from jaxseq.cells import GRU, LSTM, Bidirectional, Elman, Stack, bidirectional, make_cell, stack
from jaxseq.checkpoint import CheckpointManager
from jaxseq.config import TrainConfig
from jaxseq.data import CharTokenizer, DataBundle, eval_batches, lm_batch, load_text, prepare_data, validate_batch
from jaxseq.decoding import SampleOutput, beam_search, sample, top_k_filter, top_p_filter
from jaxseq.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    JaxseqError,
    NonFiniteError,
    ShapeError,
    TokenRangeError,
)
from jaxseq.kernels import explain
from jaxseq.interop import from_torch, gpt2_from_hf, to_torch, to_torch_state_dict
from jaxseq.linear_cells import LRU, MinGRU, MinLSTM, make_linear_cell
from jaxseq.losses import lm_loss_fn, token_nll
from jaxseq.models import MODELS, build_model
from jaxseq.models.classifier import SequenceClassifier
from jaxseq.models.additive import AdditiveLM
from jaxseq.models.encdec import TransformerSeq2Seq
from jaxseq.models.ngram import NGramLM
from jaxseq.models.rnn_lm import RecurrentLM
from jaxseq.models.seq2seq import ImageEncoder, RNNSeq2Seq, TextEncoder
from jaxseq.models.transformer import TransformerLM
from jaxseq.run import Run, load_run
from jaxseq.scan import StepOnly, unroll
from jaxseq.sharding import batch_sharding, make_mesh, maybe_initialize_distributed, shard_batch, state_shardings
from jaxseq.steps import ShardedStep, TrainState, make_eval_step, make_optimizer, make_sharded_step, make_train_step
from jaxseq.tasks import TASKS, MNIST1D, Captioning, CharLM, Translation
from jaxseq.train import train

__version__ = "0.1.0"
