"""Bridge to PyTorch's `nn.RNN`, `nn.LSTM` and `nn.GRU`: weights and states, both ways.

    cell, params = from_torch(torch_lstm)            # same outputs as the torch module
    ys, carry = jaxseq.unroll(cell, params, xs)      # xs: [B, T, d_in], batch-major
    module.load_state_dict(to_torch_state_dict(cell, params))

Layout. jaxseq stores weights transposed (`w_ih = weight_ih_l{k}.T`, `w_hh =
weight_hh_l{k}.T`, `b_ih = bias_ih_l{k}`, `b_hh = bias_hh_l{k}`) with PyTorch's gate
order, so a port is a transpose. A module with `num_layers > 1` becomes a `Stack`
(its `dropout` becomes `Stack.dropout`: between layers, training only); a
bidirectional one becomes `Bidirectional` layers (torch's `_reverse` tensors are the
backward cell). `bias=False` gives zero biases; `proj_size != 0` is not supported.

`batch_first` is not stored: `unroll` is always batch-major. With a
`batch_first=False` torch module, feed jaxseq `x.transpose(0, 1)` and transpose the
outputs back. States: torch's `h_n` / `c_n` are `[num_layers * num_directions, B, H]`
(index `layer * num_directions + direction`); `carry_from_torch` / `carry_to_torch`
convert between them and a jaxseq carry.

`torch` is imported inside the functions only: it is never a dependency of the core.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxseq.cells import GRU, LSTM, Bidirectional, Elman, Stack
from jaxseq.errors import ConfigError, ShapeError

_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh")
_TORCH_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _to_numpy(t) -> np.ndarray:
    """A torch tensor or array-like as float32 numpy."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=np.float32)


def _base_cell(mode: str, d_in: int, d_hidden: int):
    if mode == "LSTM":
        return LSTM(d_in, d_hidden)
    if mode == "GRU":
        return GRU(d_in, d_hidden)
    if mode in ("RNN_TANH", "RNN_RELU"):
        return Elman(d_in, d_hidden, nonlinearity="tanh" if mode == "RNN_TANH" else "relu")
    raise ConfigError(f"from_torch: unsupported torch RNN mode {mode!r}; expected nn.RNN, nn.LSTM or nn.GRU.")


def from_torch(module):
    """Convert a torch `nn.RNN` / `nn.LSTM` / `nn.GRU` into `(cell, params)`.

    The cell is a single cell, a `Bidirectional`, or (num_layers > 1) a `Stack` of
    either; params are float32 jnp arrays laid out as the cell's `init` would make.
    """
    import torch.nn as tnn

    if not isinstance(module, tnn.RNNBase):
        raise ConfigError(f"from_torch: module must be nn.RNN, nn.LSTM or nn.GRU, got {type(module).__name__}.")
    if getattr(module, "proj_size", 0):
        raise ConfigError(
            f"from_torch: proj_size={module.proj_size} (LSTM with projections) has no jaxseq equivalent; "
            "use proj_size=0."
        )
    sd = module.state_dict()
    dirs = 2 if module.bidirectional else 1
    H = module.hidden_size
    layers, layer_params = [], []
    for k in range(module.num_layers):
        d_in = module.input_size if k == 0 else H * dirs
        cell = _base_cell(module.mode, d_in, H)
        per_dir = []
        for suffix in ("", "_reverse")[:dirs]:
            p = {}
            for name, tname in zip(_NAMES, _TORCH_NAMES):
                key = f"{tname}_l{k}{suffix}"
                if key in sd:
                    value = _to_numpy(sd[key])
                    p[name] = jnp.asarray(value.T if name.startswith("w") else value)
                else:  # bias=False: a zero bias is the same function
                    p[name] = jnp.zeros((cell.num_gates * H,), jnp.float32)
            per_dir.append(p)
        if dirs == 2:
            layers.append(Bidirectional(cell, cell))
            layer_params.append({"forward": per_dir[0], "backward": per_dir[1]})
        else:
            layers.append(cell)
            layer_params.append(per_dir[0])
    if module.num_layers == 1:
        return layers[0], layer_params[0]
    cell = Stack(tuple(layers), dropout=float(module.dropout))
    return cell, {f"layer_{i}": p for i, p in enumerate(layer_params)}


def _torch_layout(cell):
    """Check `cell` has a torch equivalent; return (layers, dirs, base cell of layer 0).

    layers: list of (layer cell, params key or None); a layer is a base cell or a Bidirectional.
    """
    if isinstance(cell, Stack):
        if cell.residual and any(cell.uses_residual(i) for i in range(len(cell.cells))):
            raise ConfigError("to_torch: a Stack with residual connections has no torch nn.RNN/LSTM/GRU equivalent.")
        layers = [(c, f"layer_{i}") for i, c in enumerate(cell.cells)]
    else:
        layers = [(cell, None)]
    dirs = 2 if isinstance(layers[0][0], Bidirectional) else 1
    first = layers[0][0].forward if dirs == 2 else layers[0][0]
    for i, (layer, _) in enumerate(layers):
        if isinstance(layer, Bidirectional) != (dirs == 2):
            raise ConfigError(f"to_torch: layer {i} mixes bidirectional and unidirectional layers; torch cannot.")
        for c in (layer.forward, layer.backward) if dirs == 2 else (layer,):
            if not isinstance(c, (Elman, LSTM, GRU)):
                raise ConfigError(f"to_torch: layer {i} holds {type(c).__name__}; only Elman, LSTM, GRU port.")
            want_in = first.d_in if i == 0 else first.d_hidden * dirs
            if (type(c), c.d_hidden, c.d_in, getattr(c, "nonlinearity", None)) != (
                type(first), first.d_hidden, want_in, getattr(first, "nonlinearity", None)
            ):
                raise ConfigError(
                    f"to_torch: layer {i} is {c}, but torch needs every layer to be "
                    f"{type(first).__name__}(d_in={want_in}, d_hidden={first.d_hidden})."
                )
    return layers, dirs, first


def _directions(layer, layer_params, dirs):
    if dirs == 2:
        return [(layer.forward, layer_params["forward"], ""), (layer.backward, layer_params["backward"], "_reverse")]
    return [(layer, layer_params, "")]


def torch_kwargs(cell) -> dict:
    """Constructor arguments of the torch module equivalent to `cell` (class name under 'cls')."""
    layers, dirs, first = _torch_layout(cell)
    kwargs = {
        "cls": {LSTM: "LSTM", GRU: "GRU", Elman: "RNN"}[type(first)],
        "input_size": first.d_in,
        "hidden_size": first.d_hidden,
        "num_layers": len(layers),
        "bidirectional": dirs == 2,
        "dropout": float(cell.dropout) if isinstance(cell, Stack) else 0.0,
    }
    if isinstance(first, Elman):
        kwargs["nonlinearity"] = first.nonlinearity
    return kwargs


def to_torch_state_dict(cell, params, *, bias: bool = True) -> dict:
    """The torch `state_dict` (float32 tensors) of `(cell, params)`, for `load_state_dict`.

    bias=False targets a module built with `bias=False`; then every bias must be zero.
    """
    import torch

    layers, dirs, _ = _torch_layout(cell)
    out = {}
    for k, (layer, key) in enumerate(layers):
        lp = params if key is None else params[key]
        for _, p, suffix in _directions(layer, lp, dirs):
            for name, tname in zip(_NAMES, _TORCH_NAMES):
                value = np.array(p[name], dtype=np.float32)
                if name.startswith("b") and not bias:
                    if np.any(value != 0):
                        raise ConfigError(f"to_torch_state_dict(bias=False): {name} of layer {k} is not zero.")
                    continue
                out[f"{tname}_l{k}{suffix}"] = torch.from_numpy(value.T.copy() if name.startswith("w") else value)
    return out


def to_torch(cell, params, *, batch_first: bool = False):
    """A torch module (float32, eval mode) computing the same function as `(cell, params)`."""
    import torch.nn as tnn

    kwargs = torch_kwargs(cell)
    cls = getattr(tnn, kwargs.pop("cls"))
    module = cls(**kwargs, batch_first=batch_first)
    module.load_state_dict(to_torch_state_dict(cell, params))
    return module.eval()


def _unit_carries(cell):
    """Per (layer, direction) base cells in torch's order (layer-major, direction-minor)."""
    layers, dirs, _ = _torch_layout(cell)
    units = [c for layer, _ in layers for c in ((layer.forward, layer.backward) if dirs == 2 else (layer,))]
    return units, layers, dirs


def carry_from_torch(cell, h, c=None):
    """Torch `h` (and `c` for LSTM), `[num_layers * dirs, *B, H]`, as a jaxseq carry for `cell`."""
    units, layers, dirs = _unit_carries(cell)
    h = _to_numpy(h)
    is_lstm = isinstance(units[0], LSTM)
    if is_lstm and c is None:
        raise ShapeError("carry_from_torch: an LSTM carry needs both h and c (torch's (h_0, c_0)).")
    c = _to_numpy(c) if is_lstm else None
    if h.shape[0] != len(units) or (c is not None and c.shape != h.shape):
        raise ShapeError(
            f"carry_from_torch: h has shape {h.shape}"
            + (f", c {c.shape}" if c is not None else "")
            + f"; expected [{len(units)} (= num_layers * num_directions), batch, {units[0].d_hidden}]."
        )
    per_unit = [(jnp.asarray(h[i]), jnp.asarray(c[i])) if is_lstm else jnp.asarray(h[i]) for i in range(len(units))]
    per_layer = [tuple(per_unit[k * dirs:(k + 1) * dirs]) if dirs == 2 else per_unit[k] for k in range(len(layers))]
    return tuple(per_layer) if isinstance(cell, Stack) else per_layer[0]


def carry_to_torch(cell, carry):
    """A jaxseq carry as torch's final state: `h_n` (Elman, GRU) or `(h_n, c_n)` (LSTM), float32 tensors."""
    import torch

    units, layers, dirs = _unit_carries(cell)
    per_layer = list(carry) if isinstance(cell, Stack) else [carry]
    per_unit = [u for layer_carry in per_layer for u in (layer_carry if dirs == 2 else (layer_carry,))]

    def stacked(xs):
        return torch.from_numpy(np.stack([np.array(x, dtype=np.float32) for x in xs]))

    if isinstance(units[0], LSTM):
        return stacked([u[0] for u in per_unit]), stacked([u[1] for u in per_unit])
    return stacked(per_unit)


def gpt2_from_hf(path, **kwargs):
    """Load a Hugging Face GPT-2 checkpoint directory into a TransformerLM: see `jaxseq.interop_gpt2`."""
    from jaxseq.interop_gpt2 import gpt2_from_hf as load

    return load(path, **kwargs)
