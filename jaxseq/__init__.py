"""jaxseq: sequence models in JAX/Flax. Public names are re-exported here; nothing else."""

from jaxseq.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    JaxseqError,
    NonFiniteError,
    ShapeError,
    TokenRangeError,
)

__version__ = "0.1.0"
