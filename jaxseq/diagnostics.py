"""Gradient diagnostics: how far back a gradient reaches.

    norms = input_gradient_norms(task, model, variables, batch)   # [B, T]: || d loss / d input_t ||
    norms = state_jacobian_norms(cell, params, xs)                 # [T]: || d carry_T / d carry_t ||, t = 0..T-1

The first works for any differentiable model of the library: the gradient of the task's loss with respect
to each input vector (the token embedding a model looks up, or the input features themselves). The
second is the recurrence's own Jacobian product, the quantity behind vanishing and exploding gradients
(Bengio et al. 1994; Pascanu et al. 2013): d c_T / d c_t = A_T A_{T-1} ... A_{t+1} with
A_s = d c_s / d c_{s-1} along the actual trajectory.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxseq.errors import ConfigError


def _embedding_offset(delta, token_shape):
    """A Flax method interceptor adding `delta` [B, T, d] to the first embedding lookup of tokens of
    `token_shape` (the model's token embedding; position tables are looked up with another shape)."""
    seen = {"hit": False}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (not seen["hit"] and context.method_name == "__call__" and isinstance(context.module, nn.Embed)
                and args and getattr(args[0], "shape", None) == token_shape):
            seen["hit"] = True
            return out + delta.astype(out.dtype)
        return out

    return interceptor, seen


def input_gradient_norms(task, model, variables, batch, *, input_key: str = "inputs"):
    """|| d loss / d x_t || for every row and position of `batch`: float32 [B, T].

    The loss is `task.loss(model, variables, batch)` (deterministic). x_t is the vector the model reads at
    position t: the output of its token embedding for integer inputs (found by intercepting the first
    `nn.Embed` lookup of an array shaped like `batch[input_key]`), the features themselves for float
    inputs. Row b's loss term is what makes row b's gradient; the loss is a mean over the batch, so the
    norms scale with 1 / batch size.
    """
    inputs = jnp.asarray(batch[input_key])
    if jnp.issubdtype(inputs.dtype, jnp.floating):
        def loss_of(x):
            return task.loss(model, variables, {**batch, input_key: x}, None)[0]
        grad = jax.grad(loss_of)(inputs)
        return jnp.sqrt(jnp.sum(jnp.square(grad.reshape(*inputs.shape[:2], -1)), axis=-1))

    probe = {}

    def loss_of(delta):
        interceptor, seen = _embedding_offset(delta, inputs.shape)
        with nn.intercept_methods(interceptor):
            loss = task.loss(model, variables, batch, None)[0]
        probe["hit"] = seen["hit"]
        return loss

    d_embed = _embedding_width(model, variables, inputs)
    grad = jax.grad(loss_of)(jnp.zeros((*inputs.shape, d_embed), jnp.float32))
    if not probe["hit"]:
        raise ConfigError(f"{type(model).__name__} looks up no token embedding (nn.Embed) of the inputs: the input "
                          f"gradient needs a differentiable model (the n-gram counts have none).")
    return jnp.linalg.norm(grad, axis=-1)


def _embedding_width(model, variables, inputs) -> int:
    """The width of the model's token embedding: the output of the first matching nn.Embed lookup."""
    width = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (not width and context.method_name == "__call__" and isinstance(context.module, nn.Embed)
                and args and getattr(args[0], "shape", None) == inputs.shape):
            width["d"] = out.shape[-1]
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, inputs)
    if not width:
        raise ConfigError(f"{type(model).__name__} looks up no token embedding (nn.Embed) of the inputs: the input "
                          f"gradient needs a differentiable model (the n-gram counts have none).")
    return width["d"]


def state_jacobian_norms(cell, params, xs, carry=None, *, ord=2):
    """|| d c_T / d c_t || for t = 0 .. T-1 along one sequence: float32 [T] (index t; T - t steps apart).

    cell: a jaxseq cell; xs: [T, d_in] (one sequence); carry: its initial carry for batch shape () (None:
    `cell.initial_carry(())`). c_t is the whole carry flattened (an LSTM's (h, c) together); c_0 is the
    initial carry and c_s = step(c_{s-1}, xs[s-1]). ord: the matrix norm (2: the largest singular value).
    """
    xs = jnp.asarray(xs, jnp.float32)
    if xs.ndim != 2:
        raise ConfigError(f"xs must be one sequence [T, d_in], got shape {xs.shape}.")
    carry = cell.initial_carry(()) if carry is None else carry
    flat0, unravel = ravel_pytree(carry)

    def step_flat(c, x):
        new, _ = cell.step(params, unravel(c), x)
        return ravel_pytree(new)[0]

    def forward(c, x):
        nxt = step_flat(c, x)
        return nxt, c  # emit the carry each step consumes

    _, consumed = jax.lax.scan(forward, flat0, xs)  # consumed[s-1] = c_{s-1}
    steps = jax.vmap(jax.jacfwd(step_flat))(consumed, xs)  # steps[s-1] = A_s = d c_s / d c_{s-1}

    def back(acc, a):  # acc = d c_T / d c_s  ->  d c_T / d c_{s-1}
        acc = acc @ a
        return acc, acc

    eye = jnp.eye(flat0.size, dtype=jnp.float32)
    _, prods = jax.lax.scan(back, eye, steps, reverse=True)  # prods[t] = d c_T / d c_t
    return jax.vmap(lambda m: jnp.linalg.norm(m, ord=ord))(prods)
