"""jaxseq/malloc.py: the glibc malloc setting that lets a train step reuse the memory the previous one freed.

The switch itself (applied, or skipped with JAXSEQ_MALLOC=system) is checked in the default suite; what it
is for, page faults between steps, is counted by the OS and measured in the `system` test (`-m system`).
"""

import os
import subprocess
import sys

import pytest

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

_SWITCH = """
import os, platform
from jaxseq.malloc import keep_freed_memory
os.environ["JAXSEQ_MALLOC"] = "system"
skipped = keep_freed_memory()
del os.environ["JAXSEQ_MALLOC"]
print(skipped, keep_freed_memory(), platform.libc_ver()[0])
"""


@linux_only
def test_keep_freed_memory_applies_on_glibc_unless_jaxseq_malloc_is_system():
    # In a child: the setting is process-wide, and pytest's own process should keep glibc's defaults.
    env = {k: v for k, v in os.environ.items() if k != "JAXSEQ_MALLOC"}
    proc = subprocess.run([sys.executable, "-c", _SWITCH], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped, applied, libc = proc.stdout.split()
    assert skipped == "False"
    assert applied == str(libc == "glibc"), proc.stdout  # every mallopt call accepted where glibc is the libc


_FAULTS = """
import resource
import jax, jax.numpy as jnp, numpy as np, optax
from jaxseq.malloc import keep_freed_memory
applied = keep_freed_memory()  # before JAX's first computation
from jaxseq.config import TransformerConfig
from jaxseq.models.transformer import TransformerLM
from jaxseq.steps import init_train_state, make_train_step
from jaxseq.tasks import CharLM
model = TransformerLM.from_config(TransformerConfig(num_layers=2, d_model=128, max_len=128, dropout=0.0), vocab_size=65)
task = CharLM(seq_len=128, batch_size=16)
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (16, 128)), jnp.int32)
batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones(tokens.shape, bool)}
optimizer = optax.adamw(1e-3)
state = init_train_state(jax.jit(model.init)(jax.random.key(0), tokens)["params"], optimizer)
loss_fn = lambda params, batch, rng: task.loss(model, {"params": params}, batch, rng)
step = jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=0)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, " ".join(map(str, faults[5:])))
"""


@pytest.mark.system  # counts the OS's page faults; the numbers depend on glibc, the kernel and XLA's allocations
@linux_only
def test_keep_freed_memory_stops_page_faults_between_steps():
    """A Transformer train step, with glibc's defaults, maps ~40 MB of buffers afresh on every step and
    faults each page in again; with keep_freed_memory() the steps reuse the heap (jaxseq/malloc.py)."""
    procs = {  # side by side: page faults are counted per process
        mode: subprocess.Popen([sys.executable, "-c", _FAULTS], env=dict(os.environ, JAXSEQ_MALLOC=mode),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode in ("system", "jaxseq")
    }
    runs = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        applied, *faults = out.split()
        runs[mode] = (applied == "True", sorted(map(int, faults)))
    assert runs["system"][0] is False and runs["jaxseq"][0] is True
    assert runs["system"][1][0] > 5000, runs  # every step: 20 MB of fresh pages or more
    assert runs["jaxseq"][1][2] < 100, runs  # most steps: none (glibc still maps one afresh now and then)
