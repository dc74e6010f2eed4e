"""gpt2_from_hf: a small random GPT-2 built offline with `transformers` gives the same logits in jaxseq."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.errors import CheckpointError, ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from jaxseq.interop_gpt2 import gpt2_from_hf  # noqa: E402

VOCAB, CTX = 50, 32


def save_random_gpt2(path, **config):
    """A 2-layer GPT-2 with random weights (initializer_range 0.2, so logits are far from uniform)."""
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_embd=64, n_head=4, n_positions=CTX, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
               initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **config})).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1 and 0; perturb them so they are tested too
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(str(path))
    return hf


def hf_logits(hf, toks):
    with torch.no_grad():
        return hf(torch.from_numpy(toks).long()).logits.numpy()


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(tie_word_embeddings=False), dict(activation_function="gelu", n_inner=96, layer_norm_epsilon=1e-3)],
    ids=["tied-gelu_new", "untied", "exact-gelu-n_inner-eps"],
)
def test_logits_match_transformers(tmp_path, kwargs):
    hf = save_random_gpt2(tmp_path, **kwargs)
    model, variables = gpt2_from_hf(str(tmp_path))
    assert model.tie_embeddings == kwargs.get("tie_word_embeddings", True)
    assert ("lm_head" in variables["params"]) != model.tie_embeddings
    toks = np.random.default_rng(0).integers(0, VOCAB, (2, CTX)).astype(np.int64)
    ref = hf_logits(hf, toks)
    assert ref.std() > 1.0  # the comparison is not between two near-uniform outputs
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(toks, jnp.int32)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_pytorch_bin_and_kv_cache_generation_match(tmp_path):
    """A pytorch_model.bin in the layout of the original `gpt2` hub checkpoint (GPT2Model keys without the
    "transformer." prefix, causal-mask buffers, no lm_head) loads too, and the KV-cache path reproduces
    transformers' logits token by token."""
    hf = save_random_gpt2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    sd = dict(hf.transformer.state_dict())
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, CTX, CTX))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model, variables = gpt2_from_hf(str(tmp_path))
    toks = np.random.default_rng(1).integers(0, VOCAB, (2, 12)).astype(np.int64)
    ref = hf_logits(hf, toks)
    step = jax.jit(lambda v, s, t: model.apply(v, s, t, method="step"))
    prefill = jax.jit(lambda v, s, x: model.apply(v, s, x, method="prefill"))
    state = model.apply(variables, 2, 12, method="init_state")
    state, logits = prefill(variables, state, jnp.asarray(toks[:, :5], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), ref[:, 4], atol=1e-4, rtol=1e-4)
    for t in range(5, 12):
        state, logits = step(variables, state, jnp.asarray(toks[:, t], jnp.int32))
        np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-4, rtol=1e-4)


def test_unsupported_or_broken_checkpoints_raise(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        gpt2_from_hf(str(tmp_path))
    save_random_gpt2(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())

    def write(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))

    write(scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ConfigError, match="scales attention"):
        gpt2_from_hf(str(tmp_path))
    write(activation_function="relu")
    with pytest.raises(ConfigError, match="activation_function"):
        gpt2_from_hf(str(tmp_path))
    write(n_embd=32, n_head=4)  # config no longer matches the weights
    with pytest.raises(CheckpointError, match="shape"):
        gpt2_from_hf(str(tmp_path))
    write()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        gpt2_from_hf(str(tmp_path))
