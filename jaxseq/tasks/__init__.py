"""Tasks: what the data is, how a batch is cut, the loss and the evaluation (DESIGN.md, "Tasks").

A task is a frozen dataclass whose fields are its config (it is its own `jaxseq train` section:
`--char-lm.*`, `--mnist1d.*`, `--stdlib-docs.*`, `--translation.*`, `--captioning.*`). The training loop knows nothing about text or images; it calls:

    data = task.prepare(run_dir=None)              # load or generate once (cached, offline); with the
                                                   # run_dir of a saved run, reuse its vocabulary
    task.save(data, run_dir)                       # what the run needs later (e.g. tokenizer.json)
    spec = task.model_spec(data)                   # {"interface": "lm" | "classifier" | "documents" | "seq2seq", sizes...}
    batch = task.batch(data, "train", index, seed) # a pure function of (seed, index): exact resume
    batches = task.eval_batches(data, "val", max_batches)   # fixed batches, fixed shapes
    loss, sums = task.loss(model, variables, batch, rng)    # jittable; rng None = deterministic
    report = task.evaluate(model, variables, data) # host side: accuracy, bits, BLEU, ...
    inputs = task.example_inputs(data)             # ShapeDtypeStruct(s) [1, ...] for model.init (a tuple:
                                                   # several arguments); works with data None

`sums` holds per-batch sums: "count" (what the loss averages over: tokens, examples) and "sum_<name>"
for each reported mean (`means` turns summed sums into {"<name>": mean}), so evaluation over many
batches is a mean over items, not a mean of batch means. `task.unit` names an item ("tok", "ex").
A new task is one file here and one line in TASKS.
"""

from __future__ import annotations

from jaxseq.tasks.audio import Audio
from jaxseq.tasks.captioning import Captioning
from jaxseq.tasks.char_lm import CharLM
from jaxseq.tasks.common import evaluate_sums, means, sum_over
from jaxseq.tasks.images import Images
from jaxseq.tasks.mnist1d import MNIST1D
from jaxseq.tasks.music import Music
from jaxseq.tasks.probes import Probes
from jaxseq.tasks.stdlib_docs import StdlibDocs
from jaxseq.tasks.translation import Translation

# name -> task class; the name is also its TrainConfig section.
TASKS = {
    "char_lm": CharLM,
    "mnist1d": MNIST1D,
    "stdlib_docs": StdlibDocs,
    "translation": Translation,
    "captioning": Captioning,
    "audio": Audio,
    "images": Images,
    "music": Music,
    "probes": Probes,
}

__all__ = ["TASKS", "Audio", "Captioning", "CharLM", "Images", "MNIST1D", "Music", "Probes", "StdlibDocs", "Translation", "evaluate_sums", "means", "sum_over"]
