"""The pure training step and what it is made of: TrainState, the optimizer, the sharded step, the eval step.

    optimizer = make_optimizer(config.optim, total_steps=config.steps)
    state = init_train_state(params, optimizer)
    loss_fn = lambda params, batch, rng: task.loss(model, {"params": params}, batch, rng)
    step_fn = jax.jit(make_train_step(loss_fn, optimizer, seed=config.seed))
    state, metrics = step_fn(state, batch)          # metrics: loss, grad_norm, lr, nonfinite, count, ...

Determinism: the dropout key of step s is `fold_in(key(seed), s)` (the seed is baked into the step
function's closure; the step number comes from the state), so with batches that are a pure function
of (seed, index) a resumed run repeats an uninterrupted one bit for bit.

Non-finite steps: a step whose loss or gradient global norm is inf/NaN leaves params and optimizer state
bit-for-bit unchanged (so one bad batch cannot poison Adam's moments), still advances `step` (the data
moves on), and counts in `nonfinite_count` (reset by the next good step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxseq.config import OptimConfig, TrainConfig
from jaxseq.errors import ConfigError
from jaxseq.losses import cast_floating
from jaxseq.sharding import batch_sharding, replicated, state_shardings


class TrainState(NamedTuple):
    """Everything that changes during training; arrays only, so Orbax saves it as it is.

    step: int32 [] (number of steps taken, good or not; also the data position);
    params, opt_state: pytrees; nonfinite_count: int32 [] (consecutive non-finite steps).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_count: jax.Array


def init_train_state(params, optimizer) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((), jnp.int32))


# -- optimizer ------------------------------------------------------------------------------------------


def make_schedule(optim: OptimConfig, total_steps: int):
    """Linear warm-up from lr/(warmup+1) to lr over `warmup_steps`, then cosine decay to lr*min_lr_ratio at total_steps.

    Starting at lr/(warmup+1), not 0, so that the first step is not wasted (nanoGPT's (it+1)/(warmup+1)).
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=optim.lr / (optim.warmup_steps + 1),
        peak_value=optim.lr,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1),  # optax counts the warm-up in decay_steps
        end_value=optim.lr * optim.min_lr_ratio,
    )


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW on the warm-up-cosine schedule.

    grad_clip <= 0 disables clipping. Weight decay applies to matrices only (ndim >= 2), not to biases,
    LayerNorm scales or other vectors (as nanoGPT and most LM recipes). The learning rate is injected
    as a hyperparameter, so the one actually used is in the optimizer state (reported as `lr`).
    """
    if not optim.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {optim.lr}.")
    if optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}.")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (end lr = lr * ratio), got {optim.min_lr_ratio}.")

    if not optim.body_lr_ratio >= 0.0:
        raise ConfigError(f"--optim.body-lr-ratio must be >= 0 (0 freezes the body), got {optim.body_lr_ratio}.")

    def build(learning_rate):
        decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)  # noqa: E731

        def adamw(lr):
            return optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask)

        if optim.body_lr_ratio == 1.0:
            update = adamw(learning_rate)
        else:  # the body's own rate; a frozen body gets exact zeros and keeps no Adam moments
            body = optax.set_to_zero() if optim.body_lr_ratio == 0.0 else adamw(learning_rate * optim.body_lr_ratio)
            update = optax.multi_transform({"body": body, "rest": adamw(learning_rate)}, _body_labels)
        return optax.chain(
            optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(), update)

    return optax.inject_hyperparams(build)(learning_rate=make_schedule(optim, total_steps))


def _body_labels(params):
    """"body" for the parameters under params["body"] (a classifier's LM body), "rest" for the others."""
    if not isinstance(params, dict) or "body" not in params:
        raise ConfigError("--optim.body-lr-ratio other than 1 needs a model with a language-model body (a "
                          "classifier of token documents, e.g. --task stdlib_docs); this model has none.")
    return {k: jax.tree.map(lambda _: "body" if k == "body" else "rest", v) for k, v in params.items()}


# -- steps ----------------------------------------------------------------------------------------------


def make_train_step(loss_fn, optimizer, *, seed: int = 0):
    """A pure `step_fn(state, batch) -> (state, metrics)`; jit it once.

    loss_fn(params, batch, rng) -> (loss, sums) (a task's loss with the model bound, see `jaxseq.tasks`);
    rng is the dropout key `fold_in(key(seed), state.step)`. metrics: loss, grad_norm (before clipping),
    lr (used this step), nonfinite (1 if the step was skipped), nonfinite_count, count (the items the
    loss averaged over, from sums["count"]; 0 if absent).
    """
    base_key = jax.random.key(seed)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(base_key, state.step)
        (loss, aux), grads = grad_fn(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            params, opt_state = operands
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # cond, not where: on a bad step the optimizer never sees the NaN gradients, and the old
        # params/opt_state are returned as they are (bit for bit).
        params, opt_state = jax.lax.cond(ok, update, lambda operands: operands, (state.params, state.opt_state))
        count = jnp.where(ok, 0, state.nonfinite_count + 1).astype(jnp.int32)
        new_state = TrainState(state.step + 1, params, opt_state, count)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": _current_lr(opt_state),
            "nonfinite": (~ok).astype(jnp.int32),
            "nonfinite_count": count,
            "count": aux.get("count", jnp.zeros((), jnp.int32)) if isinstance(aux, dict) else jnp.zeros((), jnp.int32),
        }
        return new_state, metrics

    return step_fn


class ShardedStep(NamedTuple):
    """A run's state and step on a mesh (see `make_sharded_step`)."""

    init: Any  # () -> TrainState, created already sharded
    step: Any  # (state, batch) -> (state, metrics); jitted once, state donated
    shardings: Any  # the TrainState's NamedShardings
    abstract: Any  # the TrainState's ShapeDtypeStructs with those shardings (a restore template)


def make_sharded_step(loss_fn, init_params, optimizer, mesh, *, seed: int = 0, compiler_options=None) -> ShardedStep:
    """Init and train step on `mesh`, the same code on one CPU, 8 fake CPUs, a GPU or many hosts.

    loss_fn(params, batch, rng) -> (loss, sums), as for `make_train_step`; init_params() -> params
    (traced under jit, so no device ever holds more than its shard of a big model). Params and
    optimizer state get `jaxseq.sharding.state_shardings` (replicated, or split along their largest
    axis that --mesh.fsdp divides); batches are split over every device (`batch_sharding`); metrics
    come back replicated. compiler_options: XLA options of the step (`jaxseq.xla_options`).
    """

    def init_state():
        return init_train_state(init_params(), optimizer)

    abstract = jax.eval_shape(init_state)
    shardings = state_shardings(mesh, abstract)
    step = jax.jit(
        make_train_step(loss_fn, optimizer, seed=seed),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )
    template = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return ShardedStep(jax.jit(init_state, out_shardings=shardings), step, shardings, template)


def make_eval_step(sums_fn, *, mesh=None, param_shardings=None, compiler_options=None):
    """Jitted `(params, batch) -> sums`: a task's summed metrics without dropout (see `jaxseq.tasks`).

    sums_fn(params, batch) -> dict of scalars. mesh, param_shardings: compile for params with these
    shardings and a batch split over `mesh` (as `train()` feeds it); the sums come back replicated,
    readable by every process.
    """
    if mesh is None:
        return jax.jit(sums_fn, compiler_options=compiler_options)
    return jax.jit(sums_fn, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=replicated(mesh),
                   compiler_options=compiler_options)


def _current_lr(opt_state):
    hyperparams = getattr(opt_state, "hyperparams", None)
    if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
        return jnp.asarray(hyperparams["learning_rate"], jnp.float32)
    return jnp.full((), jnp.nan, jnp.float32)


# -- a task's loss as the step's loss_fn, in the run's compute dtype ------------------------------------


def task_loss_fn(task, model, compute_dtype=None):
    """`loss_fn(params, batch, rng) -> (loss, sums)` for `make_train_step`: `task.loss` with `model` bound.

    compute_dtype (e.g. jnp.bfloat16): the float32 params are cast inside the loss, so the forward and
    backward pass run in it while the gradients come back float32 (the cast's transpose); build the
    model with `with_compute_dtype` too, or modules with their own `dtype` promote back to float32.
    """

    def loss_fn(params, batch, rng):
        if compute_dtype is not None:
            params = cast_floating(params, compute_dtype)
        return task.loss(model, {"params": params}, batch, rng)

    return loss_fn


def compute_dtype_of(config: TrainConfig):
    """None for float32 (nothing to cast), else the jnp dtype of `config.compute_dtype`."""
    if config.compute_dtype == "float32":
        return None
    if config.compute_dtype != "bfloat16":
        raise ConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}.")
    if config.model == "lru":
        raise ConfigError("--model lru needs --compute-dtype float32: its complex eigenvalues have no bfloat16 form.")
    return jnp.bfloat16


def with_compute_dtype(model, dtype):
    """A module whose own `dtype` (compute dtype, e.g. TransformerLM's) is `dtype`; others as they are.

    Modules built from cells and dtype-less Flax layers compute in their params' dtype, which the loss casts.
    """
    if dtype is None or not hasattr(model, "dtype"):
        return model
    return model.clone(dtype=dtype)
