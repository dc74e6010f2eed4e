"""The probe tasks: deterministic generators, labels right on hand-checked cases, the loss at the answer only,
and the order probe's point (an order-blind model sits at chance, an RNN does not)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxseq.config import TrainConfig
from jaxseq.errors import ConfigError
from jaxseq.tasks.probes import Probes
from jaxseq.train import train


def test_generators_are_deterministic_per_seed():
    for probe in ("recall", "order", "pairwise", "length"):
        task = Probes(probe=probe, distance=7, length=6, num_symbols=8, batch_size=4)
        a, b = task.batch(None, "train", 3, seed=1), task.batch(None, "train", 3, seed=1)
        c = task.batch(None, "train", 4, seed=1)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a["inputs"], c["inputs"])
        assert a["inputs"].shape == (4, task.max_len("train"))


def test_recall_layout_and_answer():
    task = Probes(probe="recall", distance=5, num_pairs=3, num_symbols=4)
    S, query = 4, 12
    for seq, answer in task.generate(np.random.default_rng(0), 50):
        assert len(seq) == 2 * 3 + 5 + 2 and seq[-2] == query
        keys, values = seq[0:6:2], seq[1:6:2]
        assert set(keys) <= set(range(S)) and len(set(keys)) == 3 and set(values) <= set(range(S, 2 * S))
        assert all(2 * S <= d < 3 * S for d in seq[6:11])
        assert answer == values[list(keys).index(seq[-1])]  # the value stored with the asked key


def test_order_pairwise_length_labels_by_hand():
    order = Probes(probe="order", length=10, num_symbols=5)
    sp = order._specials()
    for seq, answer in order.generate(np.random.default_rng(1), 100):
        i, j = list(seq).index(sp["a"]), list(seq).index(sp["b"])
        assert answer == (sp["yes"] if i < j else sp["no"])
    pair = Probes(probe="pairwise", length=6, num_symbols=8)
    sp = pair._specials()
    answers = []
    for seq, answer in pair.generate(np.random.default_rng(2), 200):
        body = list(seq[:-1])
        assert answer == (sp["yes"] if len(set(body)) < len(body) else sp["no"])
        answers.append(answer)
    assert 0.35 < np.mean(np.array(answers) == sp["yes"]) < 0.65  # balanced classes
    for rule in ("majority", "parity"):
        task = Probes(probe="length", length=9, rule=rule)
        sp = task._specials()
        for seq, answer in task.generate(np.random.default_rng(3), 100):
            a = int(np.sum(seq[:-1] == 0))
            yes = a > len(seq) - 1 - a if rule == "majority" else a % 2 == 1
            assert answer == (sp["yes"] if yes else sp["no"])
    data = Probes(probe="length", length=4).prepare()
    assert {len(s) - 1 for s, _ in data["test_4x"]} == {16} and {len(s) - 1 for s, _ in data["test_2x"]} == {8}


def test_eval_batches_pad_with_zero_weight():
    task = Probes(probe="order", length=5, batch_size=16, test_size=40)
    batches = task.eval_batches(task.prepare(), "val", 100)
    assert len(batches) == 3 and sum(int(b["weight"].sum()) for b in batches) == 40
    assert batches[0]["answer_pos"][0] == 5 and batches[0]["mask"][0].sum() == 6


def test_bad_config_names_the_flag():
    with pytest.raises(ConfigError, match="--probes.num-symbols"):
        Probes(probe="pairwise", length=10, num_symbols=6).prepare()
    with pytest.raises(ConfigError, match="--probes.num-pairs"):
        Probes(probe="recall", num_pairs=0).prepare()


def _run(tmp_path, model, steps, **probe):
    config = TrainConfig(task="probes", model=model, steps=steps, eval_every=steps, checkpoint_every=steps,
                         eval_batches=8, progress=False, run_dir=str(tmp_path / model),
                         probes=Probes(**probe, batch_size=32, test_size=512),
                         rnn=dataclasses.replace(TrainConfig().rnn, d_embed=16, d_hidden=32))
    return train(None, None, config)["report"]["accuracy"]


def test_order_probe_separates_order_blind_from_recurrent(tmp_path):
    # The multiset of tokens carries no information: the additive (bag-of-context) model stays at chance,
    # while a small GRU reads the order.
    probe = dict(probe="order", length=8, num_symbols=4)
    additive = _run(tmp_path, "additive", 200, **probe)
    gru = _run(tmp_path, "gru", 200, **probe)
    assert abs(additive - 0.5) < 0.08, additive
    assert gru > 0.9, gru
