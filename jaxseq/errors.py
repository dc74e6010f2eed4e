"""Errors raised by jaxseq. Every message names the argument at fault and the fix."""


class JaxseqError(Exception):
    """Base class of every error jaxseq raises on purpose."""


class ShapeError(JaxseqError, ValueError):
    """An array has the wrong rank, shape or dtype."""


class TokenRangeError(JaxseqError, ValueError):
    """A token id is negative or not below the vocabulary size."""


class DataError(JaxseqError, ValueError):
    """A corpus or batch is empty, malformed or inconsistent."""


class ConfigError(JaxseqError, ValueError):
    """A configuration value is unknown or inconsistent."""


class CheckpointError(JaxseqError):
    """A checkpoint is missing, corrupt, or from another configuration."""


class NonFiniteError(JaxseqError, FloatingPointError):
    """Training produced non-finite losses or gradients too many steps in a row."""
