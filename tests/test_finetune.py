"""Fine-tuning: a pretrained LM's weights into a classifier's body (--init-from), frozen or at its own rate."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.config import OptimConfig, RNNConfig, TrainConfig, TransformerConfig
from jaxseq.errors import ConfigError
from jaxseq.finetune import init_from_run, load_matching
from jaxseq.run import load_run
from jaxseq.steps import make_optimizer
from jaxseq.tasks import CharLM, StdlibDocs
from jaxseq.train import train

SIZES = {"lstm": {"rnn": RNNConfig(d_embed=8, d_hidden=16)},
         "transformer": {"transformer": TransformerConfig(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=32)}}
DOCS = StdlibDocs(max_len=32, train_examples=64, batch_size=16)


def lm_config(tmp_path, model: str, corpus, **kw) -> TrainConfig:
    return TrainConfig(model=model, steps=3, eval_every=3, eval_batches=1, checkpoint_every=3, progress=False,
                       run_dir=str(tmp_path / f"lm-{model}"), char_lm=CharLM(source=str(corpus), seq_len=16, batch_size=4),
                       **{**SIZES[model], **kw})


def docs_config(tmp_path, model: str, name: str, **kw) -> TrainConfig:
    return TrainConfig(task="stdlib_docs", model=model, steps=4, eval_every=4, eval_batches=1, checkpoint_every=4,
                       progress=False, run_dir=str(tmp_path / name), stdlib_docs=DOCS, **{**SIZES[model], **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text with every printable ASCII character, so a pretrained vocabulary covers the documents."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(("".join(chr(c) for c in range(32, 127)) + "\nReturn the value of the header.\n") * 30)
    return path


@pytest.fixture(scope="module", params=["lstm", "transformer"])
def pretrained(request, tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp(f"pre-{request.param}")
    summary = train(config=lm_config(root, request.param, corpus))
    return request.param, root, summary["run_dir"]


def flat(tree) -> dict:
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_loaded_body_equals_the_pretrained_parameters_exactly(pretrained):
    from jaxseq.models import build_model

    model, root, lm_dir = pretrained
    lm = flat(load_run(lm_dir).variables["params"])
    config = docs_config(root, model, "unused")
    data = DOCS.prepare(lm_dir)
    classifier = build_model(config, DOCS.model_spec(data))
    fresh = classifier.init(jax.random.key(0), jnp.zeros((1, DOCS.max_len), jnp.int32))["params"]
    params, record = init_from_run(fresh, lm_dir)
    got = flat(params)
    body = {k[len("body/"):]: v for k, v in got.items() if k.startswith("body/")}
    assert set(body) == set(lm) - {k for k in lm if k.startswith(("head/", "lm_head/"))}
    for name, value in body.items():
        assert value.dtype == lm[name].dtype and np.array_equal(value, lm[name]), name
    # The new head keeps its initialisation; the record names it and the pretrained step.
    assert record["fresh"] == ["head/bias", "head/kernel"] and record["step"] == 3 and record["model"] == model
    assert np.array_equal(got["head/kernel"], np.asarray(fresh["head"]["kernel"]))


def test_a_frozen_body_stays_bit_identical_while_the_head_trains(pretrained, capsys):
    model, root, lm_dir = pretrained
    if model != "lstm":
        pytest.skip("freezing is the optimizer's; one family shows it")
    config = docs_config(root, model, "frozen", init_from=lm_dir, optim=OptimConfig(body_lr_ratio=0.0, warmup_steps=0))
    summary = train(config=config)
    assert "init: " in capsys.readouterr().out
    lm = flat(load_run(lm_dir).variables["params"])
    run = load_run(summary["run_dir"])  # the multi_transform optimizer state restores as it was saved
    tuned = flat(run.variables["params"])
    assert run.step == 4
    for name, value in tuned.items():
        if name.startswith("body/"):
            assert np.array_equal(value, lm[name[len("body/"):]]), name
    fresh = TrainConfig(task="stdlib_docs", model=model, **SIZES[model])
    from jaxseq.models import build_model

    init_head = build_model(fresh, run.spec).init(jax.random.key(0), jnp.zeros((1, DOCS.max_len), jnp.int32))
    assert not np.array_equal(tuned["head/kernel"], np.asarray(init_head["params"]["head"]["kernel"]))
    record = json.loads((root / "frozen" / "init_from.json").read_text())
    assert record["run_dir"] == lm_dir and record["step"] == 3 and record["config"]["model"] == model
    # The vocabulary is the pretrained run's, saved with the new run.
    assert (root / "frozen" / "tokenizer.json").read_text() == (root / "lm-lstm" / "tokenizer.json").read_text()


def test_a_body_learning_rate_ratio_scales_the_bodys_first_adam_update_exactly():
    params = {"body": {"w": jnp.ones((3, 2))}, "head": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}}
    grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) - 1.5, params)

    def first_update(ratio):
        opt = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, grad_clip=0.0, body_lr_ratio=ratio), 10)
        updates, _ = opt.update(grads, opt.init(params), params)
        return updates

    one, half, frozen = first_update(1.0), first_update(0.5), first_update(0.0)
    np.testing.assert_allclose(half["body"]["w"], 0.5 * one["body"]["w"], rtol=1e-6)
    assert np.array_equal(half["head"]["w"], one["head"]["w"]) and np.array_equal(half["head"]["b"], one["head"]["b"])
    assert np.all(frozen["body"]["w"] == 0) and np.array_equal(frozen["head"]["w"], one["head"]["w"])


def test_a_body_learning_rate_needs_a_model_with_a_body():
    opt = make_optimizer(OptimConfig(body_lr_ratio=0.5), 10)
    with pytest.raises(ConfigError, match="body-lr-ratio.*no(ne)?"):
        opt.init({"embed": jnp.ones(2), "head": jnp.ones(2)})
    with pytest.raises(ConfigError, match="--optim.body-lr-ratio must be >= 0"):
        make_optimizer(OptimConfig(body_lr_ratio=-1.0), 10)


@pytest.fixture(scope="module")
def letters_lm(tmp_path_factory):
    """An LM whose vocabulary is 28 characters: lower-case letters, space and newline."""
    root = tmp_path_factory.mktemp("letters")
    (root / "letters.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    return root, train(config=lm_config(root, "lstm", root / "letters.txt"))["run_dir"]


def test_a_mismatched_vocabulary_is_a_clear_error(letters_lm):
    root, lm_dir = letters_lm
    data = DOCS.prepare()  # the task's own vocabulary (95 characters), not the pretrained run's
    with pytest.raises(ConfigError, match=r"vocabularies differ: the pretrained run has 28 tokens, this run \d+ "
                                          r"\('body/embed/embedding'\)"):
        train(config=docs_config(root, "lstm", "cls", init_from=lm_dir), data=data)


def test_the_pretrained_vocabulary_serves_the_documents_and_drops_unknown_characters(letters_lm):
    root, lm_dir = letters_lm
    with pytest.warns(UserWarning, match=r"dropped \d+ character\(s\)"):
        data = DOCS.prepare(lm_dir)
    assert data["tokenizer"].vocab_size == 28 and data["dropped_chars"] > 0
    assert 0 < data["x_train"].max() < 28
    kept = data["tokenizer"].decode(data["x_train"][0][data["mask_train"][0]])
    assert set(kept) <= set("abcdefghijklmnopqrstuvwxyz \n")


def test_other_sizes_or_another_family_name_the_parameter(pretrained):
    model, root, lm_dir = pretrained
    if model != "lstm":
        pytest.skip("one pretrained family shows it")
    wider = docs_config(root, "lstm", "wider", init_from=lm_dir, rnn=RNNConfig(d_embed=8, d_hidden=32))
    with pytest.raises(ConfigError, match=r"parameter 'body/rnn/cell/.*' has shape .* in the pretrained run .*"
                                          r"d_hidden\": 16"):
        train(config=wider)
    with pytest.raises(ConfigError, match=r"no parameter 'h_0/.*--model lstm"):
        train(config=docs_config(root, "transformer", "other", init_from=lm_dir))


def test_init_from_a_folder_that_is_not_a_run_says_so(tmp_path):
    with pytest.raises(ConfigError, match="--init-from .*nowhere: not a run directory"):
        train(config=docs_config(tmp_path, "lstm", "cls", init_from=str(tmp_path / "nowhere")))


def test_load_matching_keeps_an_lm_whole_when_the_new_model_is_an_lm():
    source = {"embed": {"embedding": np.ones((4, 2), np.float32)}, "head": {"kernel": np.full((2, 4), 2, np.float32)}}
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), source)
    merged, loaded, fresh = load_matching(target, source)
    assert loaded == 2 and fresh == [] and np.array_equal(merged["head"]["kernel"], source["head"]["kernel"])
    with pytest.raises(ConfigError, match="no parameter of this model matches"):
        load_matching({"other": jax.ShapeDtypeStruct((2,), np.float32)}, source)
