"""A character-level LSTM language model in plain PyTorch, trained the way `jaxseq train` trains its
default LSTM, so that `time_to_quality.py` can race the two from process start to a validation loss.

Same work as `jaxseq train --char-lm.source FILE` with every default (jaxseq/config.py: TrainConfig,
RNNConfig, CharLM, OptimConfig; jaxseq/models/rnn_lm.py, jaxseq/cells.py, jaxseq/data/batches.py):

  * data: the file's characters, sorted, one id each; the first int(n * (1 - val_fraction)) ids train,
    the rest validate (nanoGPT's 90/10 split);
  * model: nn.Embedding(V, d_embed) -> nn.LSTM(d_embed, d_hidden, num_layers) -> nn.Linear(d_hidden, V)
    with a bias, untied; dropout (default 0) on the embeddings, between layers and on the LSTM outputs.
    Initialisation as jaxseq's: embedding N(0, 1/d_embed) (Flax's nn.Embed), LSTM U(-1/sqrt(H), 1/sqrt(H))
    (PyTorch's own, which jaxseq's cells copy), head weight truncated normal with std 1/sqrt(H) (Flax's
    lecun_normal), head bias 0;
  * training batches: `batch_size` windows of `seq_len + 1` ids at random starts, batch i drawn with
    `np.random.default_rng([seed, i])` exactly as `jaxseq.data.lm_batch`, so both see the same batches in
    the same order; the LSTM state starts at zero in every window (nothing is carried between batches);
  * validation: the same fixed windows as `jaxseq.data.eval_batches` (non-overlapping, evenly spread over
    the validation text, `eval_batches` batches of them), the loss summed over tokens and divided by
    their count; every `eval_every` steps and after the last step (not at step 0), as jaxseq's loop;
  * optimizer: AdamW (betas b1, b2, eps 1e-8), weight decay on tensors of 2 or more dimensions only,
    gradients clipped to a global norm, learning rate lr / (warmup + 1) rising linearly to lr over
    `warmup_steps`, then a cosine to lr * min_lr_ratio at `steps` (optax's warmup_cosine_decay_schedule,
    as `jaxseq.steps.make_schedule` builds it); `--adamw fused` (default) is torch's fused CPU kernel;
  * a checkpoint (model and optimizer state) every `checkpoint_every` steps and at the end, as jaxseq's
    loop saves one (with `--out-dir`).

`time_to_quality.py` checks all of this against jaxseq before it times anything: the ids, the batches,
the schedule, the logits of the same weights, and the weights after three optimizer steps.

Prints, flushed, as nanoGPT's train.py does (the same parser reads both):
    iter N: loss X, time Yms                  after every step (N counts from 0)
    step N: train loss X, val loss Y          after each evaluation (N = steps done; train loss: the mean
                                              training loss of the steps since the previous evaluation)

    python benchmarks/torch_char_lstm.py --source ../shared/data/tinyshakespeare.txt
    python benchmarks/torch_char_lstm.py --source FILE --compile      # torch.compile (default mode)
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------- data


def load_corpus(path: str, val_fraction: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(chars, train_ids, val_ids): the sorted characters of the file and its ids, int32 [N], split at
    int(N * (1 - val_fraction)) (jaxseq.data.split_ids)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    lookup = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int32)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    cut = int(len(ids) * (1.0 - val_fraction))
    return chars, ids[:cut], ids[cut:]


def windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """inputs, targets: int64 [B, T] = ids[s : s + T], ids[s + 1 : s + T + 1] for each start s."""
    w = ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return w[:, :-1], w[:, 1:]


def train_batch(ids: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int):
    """Training batch `index`: random window starts in [0, N - T) from default_rng([seed, index])."""
    starts = np.random.default_rng([seed, index]).integers(0, len(ids) - seq_len, size=batch_size)
    return windows(ids, starts, seq_len)


def eval_batches(ids: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[tuple]:
    """The fixed validation batches: (inputs, targets, valid [B] bool). Windows at 0, T, 2T, ..., an evenly
    spaced subset of at most batch_size * max_batches of them; a short last batch is padded with window 0
    marked invalid (fixed shapes)."""
    available = (len(ids) - 1) // seq_len
    k = min(available, batch_size * max_batches)
    starts = (np.arange(k, dtype=np.int64) * available) // k * seq_len
    n = -(-k // batch_size) * batch_size
    starts = np.concatenate([starts, np.zeros(n - k, dtype=np.int64)])
    valid = np.arange(n) < k
    return [(*windows(ids, starts[i:i + batch_size], seq_len), valid[i:i + batch_size])
            for i in range(0, n, batch_size)]


# ---------------------------------------------------------------------------------- model


class CharLSTM(nn.Module):
    """tokens [B, T] -> logits [B, T, V]; forward(x, y) -> per-token NLL [B, T]."""

    def __init__(self, vocab: int, d_embed: int, d_hidden: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_embed)
        self.lstm = nn.LSTM(d_embed, d_hidden, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_hidden, vocab)
        with torch.no_grad():  # jaxseq's (Flax's) initialisers; the LSTM keeps PyTorch's, which jaxseq copies
            self.embed.weight.normal_(0.0, d_embed ** -0.5)
            std = d_hidden ** -0.5 / 0.87962566103423978  # lecun_normal: unit variance after truncation at 2
            nn.init.trunc_normal_(self.head.weight, 0.0, std, -2 * std, 2 * std)
            self.head.bias.zero_()

    def logits(self, x):
        y, _ = self.lstm(self.drop(self.embed(x)))  # zero initial state
        return self.head(self.drop(y))

    def forward(self, x, y):
        logits = self.logits(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)


# ---------------------------------------------------------------------------------- optimizer


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr_ratio: float) -> float:
    """The learning rate of step `step` (0-based): optax.warmup_cosine_decay_schedule(lr / (warmup + 1),
    lr, warmup, max(total, warmup + 1), lr * min_lr_ratio), as jaxseq.steps.make_schedule."""
    init, end, decay = lr / (warmup + 1), lr * min_lr_ratio, max(total, warmup + 1)
    if step < warmup:
        return init + (lr - init) * step / warmup
    frac = min(step - warmup, decay - warmup) / (decay - warmup)
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: nn.Module, lr: float, b1: float, b2: float, weight_decay: float, adamw: str = "fused"):
    """AdamW with weight decay on the tensors of 2 or more dimensions (embedding, LSTM and head weights)
    and none on the biases. adamw: "fused" (one kernel, torch's fastest on CPU) or "foreach"."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kind = {"fused": True} if adamw == "fused" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=1e-8, **kind)


def backward(step_model, opt, x, y) -> torch.Tensor:
    """Gradients of the mean loss on a batch (int64 [B, T] tensors) into .grad; returns the loss (a tensor)."""
    loss = step_model(x, y).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def update(model, opt, lr: float, grad_clip: float):
    """Clip the gradients to a global norm, then one AdamW step at learning rate `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def train_step(step_model, model, opt, x, y, lr: float, grad_clip: float) -> torch.Tensor:
    """One training step; returns the mean loss (a tensor)."""
    loss = backward(step_model, opt, x, y)
    update(model, opt, lr, grad_clip)
    return loss


@torch.no_grad()
def evaluate(step_model, batches) -> float:
    """Mean NLL (nats per token) over the valid rows of the fixed validation batches."""
    total, count = 0.0, 0
    for x, y, valid in batches:
        nll = step_model(x, y)
        total += nll[valid].sum().item()
        count += int(valid.sum()) * y.shape[1]
    return total / count


# ---------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="a text file")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--d-embed", type=int, default=64)
    ap.add_argument("--d-hidden", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--b1", type=float, default=0.9)
    ap.add_argument("--b2", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adamw", choices=("fused", "foreach"), default="fused")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (default mode, inductor)")
    ap.add_argument("--out-dir", default="", help="write ckpt.pt here (none without it)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    chars, train_ids, val_ids = load_corpus(a.source, a.val_fraction)
    print(f"vocab_size {len(chars)}, train {len(train_ids)} tokens, val {len(val_ids)} tokens", flush=True)
    torch.manual_seed(a.seed)
    model = CharLSTM(len(chars), a.d_embed, a.d_hidden, a.num_layers, a.dropout)
    print(f"parameters: {sum(p.numel() for p in model.parameters())}, torch threads: {torch.get_num_threads()}", flush=True)
    step_model = torch.compile(model) if a.compile else model
    opt = make_optimizer(model, a.lr, a.b1, a.b2, a.weight_decay, a.adamw)
    val = [(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(v))
           for x, y, v in eval_batches(val_ids, a.batch_size, a.seq_len, a.eval_batches)]
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)

    def save(step):
        if a.out_dir:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                       os.path.join(a.out_dir, "ckpt.pt"))

    def run_eval(step, losses):
        model.eval()
        v = evaluate(step_model, val)
        model.train()
        print(f"step {step}: train loss {sum(losses) / max(len(losses), 1):.4f}, val loss {v:.4f}", flush=True)

    losses, step, last_eval, last_saved, t0 = [], 0, None, None, time.perf_counter()
    for i in range(a.steps):
        x, y = (torch.from_numpy(t) for t in train_batch(train_ids, a.batch_size, a.seq_len, a.seed, i))
        lossf = train_step(step_model, model, opt, x, y, lr_at(i, a.lr, a.warmup_steps, a.steps, a.min_lr_ratio),
                           a.grad_clip).item()
        losses.append(lossf)
        t1 = time.perf_counter()
        print(f"iter {i}: loss {lossf:.4f}, time {(t1 - t0) * 1e3:.2f}ms", flush=True)
        step = i + 1
        if step % a.eval_every == 0 and step < a.steps:
            run_eval(step, losses)
            losses, last_eval = [], step
        if step % a.checkpoint_every == 0:
            save(step)
            last_saved = step
        t0 = time.perf_counter()
    if last_eval != step:
        run_eval(step, losses)
    if last_saved != step:
        save(step)


if __name__ == "__main__":
    main()
