"""The PyTorch side of benchmarks/generation.py: jaxseq's weights in torch models, and generation loops.

Every torch competitor is a `Decoder`: three functions over a state whose rows are the batch (or
batch * beam) rows,

    state, logits = start(prompt)          # prompt int64 [B, P] -> logits float [B, V] of the next token
    state, logits = advance(state, token)  # token int64 [R] -> the distribution after it, [R, V]
    state = reorder(state, rows)           # rows int64 [R']: take these rows (beam search's parents)

and `sample_loop` / `beam_loop` drive any of them, the way a PyTorch user writes generation: a Python
loop, one model call per token, `torch.multinomial` to sample. The prompt always goes in one call
(`start`), which is the strongest form for each model (nn.LSTM over the whole prompt, one forward of
the GPT over it); the loops then make `new_tokens - 1` calls (the last token needs no call after it).

Models:
  * `CharLSTM`: embedding -> nn.LSTM (batch_first) -> linear, jaxseq's RecurrentLM(LSTM) in torch
    (`lstm_from_jaxseq` copies the weights through `jaxseq.interop.to_torch_state_dict`).
  * `LSTMCellStep`: one token of the same model with the LSTM written out as its cell
    (x W_ih^T + b_ih + h W_hh^T + b_hh, gates i, f, g, o in torch's order), the module that
    torch.compile fuses (dynamo does not trace nn.LSTM: `torch._dynamo.config.allow_rnn` is off by
    default, and with it on, inductor keeps aten.lstm as one opaque call, no faster).
  * `hf_gpt2_from_jaxseq`: transformers' GPT2LMHeadModel with jaxseq's TransformerLM weights (the
    names map one to one: `jaxseq.interop_gpt2`).
  * `nanogpt_from_jaxseq`: benchmarks/gpt_step.py's NanoGPT module with the same weights; `NoCacheGPT`
    generates as nanoGPT's `generate` does, the whole context recomputed for every token.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


class Decoder(NamedTuple):
    """A model under the generation loops (see the module docstring)."""

    start: Callable
    advance: Callable
    reorder: Callable


def _take(state: tuple, rows, dim: int) -> tuple:
    return tuple(t.index_select(dim, rows) for t in state)


# ------------------------------------------------------------------------------------------ loops


def pick(logits, temperature: float):
    """One token per row from logits [R, V]: argmax at temperature 0, else a draw from softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)[:, 0]


def sample_loop(dec: Decoder, prompt, new_tokens: int, temperature: float = 1.0):
    """prompt int64 [B, P] -> int64 [B, P + new_tokens]; call under torch.inference_mode()."""
    state, logits = dec.start(prompt)
    out = []
    for i in range(new_tokens):
        token = pick(logits, temperature)
        out.append(token)
        if i + 1 < new_tokens:
            state, logits = dec.advance(state, token)
    return torch.cat([prompt, torch.stack(out, 1)], 1)


def beam_loop(dec: Decoder, prompt, beam: int, new_tokens: int):
    """Beam search ranked by the sum of log-probabilities (no length penalty, no end token): the `beam`
    best continuations of each row are kept after every token. prompt int64 [B, P] -> (best sequence
    int64 [B, P + new_tokens], its log-probability float [B]).

    The prompt runs once per row; its state is then copied to the row's beams (beam k of row b is state
    row b * beam + k). The first expansion draws the `beam` best first tokens of the one prompt state."""
    B, K = prompt.shape[0], beam
    state, logits = dec.start(prompt)
    scores, token = torch.log_softmax(logits.float(), -1).topk(K, dim=-1)  # [B, K]
    state = dec.reorder(state, torch.arange(B).repeat_interleave(K))
    seqs = token[:, :, None]  # [B, K, n]
    base = (torch.arange(B) * K)[:, None]
    for _ in range(new_tokens - 1):
        state, logits = dec.advance(state, token.reshape(B * K))
        logp = torch.log_softmax(logits.float(), -1)
        V = logp.shape[-1]
        scores, idx = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V).topk(K, dim=-1)
        parent, token = idx // V, idx % V
        state = dec.reorder(state, (base + parent).reshape(-1))
        seqs = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, seqs.shape[2])), token[:, :, None]], 2)
    return torch.cat([prompt, seqs[:, 0]], 1), scores[:, 0]


# ------------------------------------------------------------------------------------------ LSTM


class CharLSTM(tnn.Module):
    """jaxseq's RecurrentLM with an LSTM cell: embedding -> nn.LSTM -> linear.

    forward(tokens [B, T]) -> logits [B, T, V] (the parallel form, for the logits check);
    step(token [B], h, c) -> (logits [B, V], h, c), h and c [layers, B, H] as nn.LSTM keeps them."""

    def __init__(self, vocab: int, d_embed: int, d_hidden: int, layers: int = 1):
        super().__init__()
        self.embed = tnn.Embedding(vocab, d_embed)
        self.lstm = tnn.LSTM(d_embed, d_hidden, layers, batch_first=True)
        self.head = tnn.Linear(d_hidden, vocab)

    def forward(self, tokens):
        ys, _ = self.lstm(self.embed(tokens))
        return self.head(ys)

    def prefill(self, tokens):
        """The whole prompt [B, P] in one nn.LSTM call -> ((h, c), logits [B, V] after its last token)."""
        ys, (h, c) = self.lstm(self.embed(tokens))
        return (h, c), self.head(ys[:, -1])

    def step(self, token, h, c):
        ys, (h, c) = self.lstm(self.embed(token)[:, None], (h, c))
        return self.head(ys[:, 0]), h, c


class LSTMCellStep(tnn.Module):
    """One token of a CharLSTM with each layer's LSTM written as its cell, on the CharLSTM's own
    parameters: forward(token [B], *state) -> (logits [B, V], *state), state = (h_0, c_0, h_1, c_1, ...),
    each [B, H]. `use_lstm_cell`: each layer as an nn.LSTMCell holding the same Parameter objects,
    instead of the written-out gates."""

    def __init__(self, lm: CharLSTM, use_lstm_cell: bool = False):
        super().__init__()
        self.lm = lm
        self.cells = None
        if use_lstm_cell:
            lstm = lm.lstm
            self.cells = tnn.ModuleList()
            for k in range(lstm.num_layers):
                cell = tnn.LSTMCell(lstm.input_size if k == 0 else lstm.hidden_size, lstm.hidden_size)
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    setattr(cell, name, getattr(lstm, f"{name}_l{k}"))  # shared, not copied
                self.cells.append(cell)

    def forward(self, token, *state):
        x, out, lstm = self.lm.embed(token), [], self.lm.lstm
        for k in range(lstm.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(lstm, f"bias_ih_l{k}"), getattr(lstm, f"bias_hh_l{k}")
            h, c = state[2 * k], state[2 * k + 1]
            if self.cells is not None:
                h, c = self.cells[k](x, (h, c))
            else:
                i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            out += [h, c]
            x = h
        return (self.lm.head(x), *out)


def lstm_from_jaxseq(model, params) -> CharLSTM:
    """A CharLSTM (float32, eval) with the weights of jaxseq's RecurrentLM `model` (an LSTM or a Stack of
    LSTMs, `params` = variables["params"]): nn.LSTM's through `jaxseq.interop.to_torch_state_dict`,
    the embedding as is, the output layer's kernel [H, V] transposed to nn.Linear's [V, H]."""
    from jaxseq.interop import to_torch_state_dict, torch_kwargs

    kw = torch_kwargs(model.cell)
    if kw["cls"] != "LSTM" or kw["bidirectional"]:
        raise ValueError(f"lstm_from_jaxseq needs a unidirectional LSTM cell, got {kw}")
    emb = np.array(params["embed"]["embedding"], np.float32)
    lm = CharLSTM(emb.shape[0], emb.shape[1], kw["hidden_size"], kw["num_layers"])
    lm.lstm.load_state_dict(to_torch_state_dict(model.cell, params["rnn"]["cell"]))
    with torch.no_grad():
        lm.embed.weight.copy_(torch.from_numpy(emb))
        lm.head.weight.copy_(torch.from_numpy(np.asarray(params["head"]["kernel"]).T.copy()))
        lm.head.bias.copy_(torch.from_numpy(np.array(params["head"]["bias"], np.float32)))
    return lm.eval()


def lstm_decoder(lm: CharLSTM) -> Decoder:
    """nn.LSTM one token at a time (state (h, c), batch on axis 1)."""

    def advance(state, token):
        logits, h, c = lm.step(token, *state)
        return (h, c), logits

    return Decoder(lm.prefill, advance, lambda state, rows: _take(state, rows, 1))


def lstm_cell_decoder(lm: CharLSTM, step: Callable) -> Decoder:
    """`step` (an LSTMCellStep, compiled or not) one token at a time; the prompt through nn.LSTM in one call."""

    def start(prompt):
        (h, c), logits = lm.prefill(prompt)
        return tuple(t for k in range(h.shape[0]) for t in (h[k], c[k])), logits

    def advance(state, token):
        logits, *state = step(token, *state)
        return tuple(state), logits

    return Decoder(start, advance, lambda state, rows: _take(state, rows, 0))


# ------------------------------------------------------------------------------------------ GPT


def hf_gpt2_from_jaxseq(model, params):
    """transformers' GPT2LMHeadModel (float32, eval, no dropout) with the config and weights of jaxseq's
    TransformerLM `model` (learned positions, tied embeddings; `params` = variables["params"]).

    GPT-2 names map to jaxseq's one to one (`jaxseq.interop_gpt2._hf_to_flax_path`), and GPT-2's Conv1D
    keeps its weight [in, out] as a Flax Dense kernel does, so the copy takes no transpose. No BOS/EOS
    token: generation never stops early."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxseq.interop_gpt2 import _hf_to_flax_path

    if model.positional != "learned" or not model.tie_embeddings or model.num_kv_heads not in (None, model.num_heads):
        raise ValueError("GPT-2 has learned positions, tied embeddings and one key/value head per head")
    cfg = GPT2Config(vocab_size=model.vocab_size, n_positions=model.max_len, n_embd=model.d_model,
                     n_layer=model.num_layers, n_head=model.num_heads, n_inner=model.d_ff,
                     activation_function="gelu_new" if model.gelu_approximate else "gelu",
                     layer_norm_epsilon=model.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    # generate drops an all-ones attention mask after the prompt, and GPT-2's forward then warns that a
    # token equal to pad_token_id might be padding: here every token is text, so the warning is noise
    transformers.logging.set_verbosity_error()
    hf = GPT2LMHeadModel(cfg)
    state = {}
    for name, ref in hf.state_dict().items():
        key = ("wte", "embedding") if name == "lm_head.weight" else _hf_to_flax_path(name)
        if key is None:  # a buffer (old versions' causal mask)
            state[name] = ref
            continue
        node = params
        for part in key:
            node = node[part]
        value = torch.from_numpy(np.array(node, np.float32))
        if value.shape != ref.shape:
            raise ValueError(f"{name}: jaxseq's {'/'.join(key)} has shape {tuple(value.shape)}, GPT-2 {tuple(ref.shape)}")
        state[name] = value
    hf.load_state_dict(state)
    return hf.eval()


def nanogpt_from_jaxseq(model, params):
    """benchmarks/gpt_step.py's NanoGPT with jaxseq's TransformerLM weights (nn.Linear keeps [out, in]:
    every kernel is transposed; the output layer is tied to wte as in both)."""
    from gpt_step import NanoGPT

    net = NanoGPT(model.vocab_size, model.max_len, model.num_layers, model.d_model, model.num_heads, model.d_ff)

    def put(t, value, transpose=False):
        value = np.asarray(value, np.float32)
        with torch.no_grad():
            t.copy_(torch.from_numpy((value.T if transpose else value).copy()))

    put(net.wte.weight, params["wte"]["embedding"])
    put(net.wpe.weight, params["wpe"]["embedding"])
    for i, block in enumerate(net.h):
        p = params[f"h_{i}"]
        for ln in ("ln_1", "ln_2"):
            put(getattr(block, ln).weight, p[ln]["scale"])
            put(getattr(block, ln).bias, p[ln]["bias"])
        for layer, q in ((block.attn.c_attn, p["attn"]["c_attn"]), (block.attn.c_proj, p["attn"]["c_proj"]),
                         (block.mlp[0], p["mlp"]["c_fc"]), (block.mlp[2], p["mlp"]["c_proj"])):
            put(layer.weight, q["kernel"], transpose=True)
            put(layer.bias, q["bias"])
    put(net.ln_f.weight, params["ln_f"]["scale"])
    put(net.ln_f.bias, params["ln_f"]["bias"])
    return net.eval()


def nanogpt_logits(net, idx, last_only: bool = True):
    """NanoGPT's forward at inference: idx [B, T] -> logits [B, V] of the last position (nanoGPT's
    `forward` without targets applies lm_head to x[:, [-1]] only), or [B, T, V] with last_only=False."""
    x = net.wte(idx) + net.wpe(torch.arange(idx.shape[1], device=idx.device))
    for block in net.h:
        x = block(x)
    x = net.ln_f(x)
    return net.lm_head(x[:, -1] if last_only else x)


def nocache_decoder(net, context: int) -> Decoder:
    """nanoGPT's `generate`: every token runs the model over the whole sequence so far (cropped to the
    last `context` tokens), no KV cache; the state is the token sequence [R, t]."""

    def start(prompt):
        return prompt, nanogpt_logits(net, prompt[:, -context:])

    def advance(idx, token):
        idx = torch.cat([idx, token[:, None]], 1)
        return idx, nanogpt_logits(net, idx[:, -context:])

    return Decoder(start, advance, lambda idx, rows: idx.index_select(0, rows))


def hf_generate_kwargs(mode: str, new_tokens: int, beam: int, temperature: float = 1.0, compile_config=None,
                       static_cache: bool = False) -> dict:
    """`generate` arguments for a `mode` ("sample" | "beam" | "greedy"): exactly `new_tokens` new tokens
    (min = max; no EOS anyway), the KV cache on; sampling from the full distribution (top_k 0, top_p 1);
    beam search over `beam` beams ranked by plain log-probability (length_penalty 0). With a
    `compile_config` (transformers.CompileConfig), a static cache and generate's compiled forward (its
    sampling and greedy paths use it; its beam search does not); `static_cache`: the static cache alone."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, use_cache=True)
    if mode == "sample":
        kw.update(do_sample=True, top_k=0, top_p=1.0, temperature=temperature, num_beams=1)
    elif mode == "beam":
        kw.update(do_sample=False, num_beams=beam, length_penalty=0.0, num_return_sequences=1, early_stopping=False)
    else:
        kw.update(do_sample=False, num_beams=1)
    if compile_config is not None:
        kw.update(compile_config=compile_config)
    if compile_config is not None or static_cache:
        kw.update(cache_implementation="static")
    return kw
