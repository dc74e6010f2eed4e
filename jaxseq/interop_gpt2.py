"""Load a Hugging Face GPT-2 checkpoint into `TransformerLM`.

    model, variables = gpt2_from_hf("path/to/gpt2")   # a directory with config.json + weights
    logits = model.apply(variables, tokens)          # == transformers.GPT2LMHeadModel(tokens).logits

Reads `model.safetensors` (with the `safetensors` package, NumPy only) or `pytorch_model.bin` (with
`torch`, weights only). Neither package nor `transformers` is needed for anything else in jaxseq.

The mapping is direct because TransformerLM uses GPT-2's names and layouts: learned positions, tied
embeddings, a fused [q | k | v] projection, pre-LayerNorm blocks, "gelu_new" (the tanh approximation).
GPT-2's `Conv1D` stores its weight as [in, out], which is already the layout of a Flax `Dense` kernel,
so only an untied `lm_head` (a torch `nn.Linear`, [out, in]) is transposed.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import CheckpointError, ConfigError
from jaxseq.models.transformer import TransformerLM

# GPT-2 activation names -> whether jax.nn.gelu uses the tanh approximation.
_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


def gpt2_config_to_kwargs(cfg: dict) -> dict:
    """TransformerLM keyword arguments from a GPT-2 `config.json` dict; raises on what it cannot express."""
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"config.json has model_type={cfg.get('model_type')!r}; gpt2_from_hf loads 'gpt2' only.")
    act = cfg.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"activation_function={act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}.")
    if cfg.get("scale_attn_by_inverse_layer_idx", False) or not cfg.get("scale_attn_weights", True):
        raise ConfigError(
            "this checkpoint scales attention differently (scale_attn_by_inverse_layer_idx or "
            "scale_attn_weights=False); TransformerLM uses 1/sqrt(head_dim) only."
        )
    d = cfg["n_embd"]
    return dict(
        vocab_size=cfg["vocab_size"],
        num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"],
        d_model=d,
        d_ff=cfg.get("n_inner") or 4 * d,
        max_len=cfg["n_positions"],
        positional="learned",
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        gelu_approximate=_ACTIVATIONS[act],
        dropout=0.0,
    )


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    st = os.path.join(path, "model.safetensors")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.numpy import load_file

        return dict(load_file(st))
    if os.path.exists(pt):
        import torch

        sd = torch.load(pt, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in sd.items()}
    raise CheckpointError(
        f"no model.safetensors or pytorch_model.bin in {path!r} (sharded checkpoints are not supported); "
        f"save the model with save_pretrained(path)."
    )


def _hf_to_flax_path(name: str) -> tuple[str, ...] | None:
    """'transformer.h.3.attn.c_attn.weight' -> ('h_3', 'attn', 'c_attn', 'kernel'); None for buffers."""
    parts = name.split(".")
    if parts[0] == "transformer":
        parts = parts[1:]
    if parts[-1] in ("masked_bias",) or (parts[-2:] == ["attn", "bias"]):
        return None  # old checkpoints store the causal mask as a buffer
    if parts[0] in ("wte", "wpe"):
        return (parts[0], "embedding")
    if parts[0] == "lm_head":
        return ("lm_head", "kernel")
    if parts[0] == "h":
        parts = [f"h_{parts[1]}"] + parts[2:]
    leaf = parts[-1]
    is_norm = any(p.startswith("ln_") for p in parts[:-1])
    if leaf == "weight":
        leaf = "scale" if is_norm else "kernel"
    return (*parts[:-1], leaf)


def gpt2_from_hf(path: str, dtype=jnp.float32, **overrides):
    """Load a GPT-2 checkpoint directory; returns (TransformerLM, {"params": ...}) in `dtype`.

    `overrides` go to TransformerLM (e.g. dropout=0.1 to fine-tune, attention_implementation="xla").
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"no config.json in {path!r}; pass the directory written by save_pretrained.")
    with open(cfg_path) as f:
        kwargs = gpt2_config_to_kwargs(json.load(f))
    model = TransformerLM(**{**kwargs, "dtype": dtype, "param_dtype": dtype, **overrides})
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    want_flat = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}

    got = {}
    for name, value in _read_state_dict(path).items():
        key = _hf_to_flax_path(name)
        if key is None or key not in want_flat:
            if key == ("lm_head", "kernel") and model.tie_embeddings:
                continue  # a tied lm_head is saved by some versions; it equals wte
            if key is None:
                continue
            raise CheckpointError(f"checkpoint tensor {name!r} has no place in TransformerLM ({key}).")
        if key == ("lm_head", "kernel"):
            value = value.T  # nn.Linear [out, in] -> Dense [in, out]
        if value.shape != want_flat[key].shape:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {value.shape}, TransformerLM expects "
                f"{want_flat[key].shape} for {'/'.join(key)}; does config.json match the weights?"
            )
        got[key] = jnp.asarray(value, dtype)
    missing = sorted("/".join(k) for k in want_flat if k not in got)
    if missing:
        raise CheckpointError(f"checkpoint in {path!r} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}.")

    params: dict = {}
    for key, value in got.items():
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return model, {"params": params}
