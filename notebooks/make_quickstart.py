"""Writes notebooks/quickstart.ipynb (cells kept here so they are reviewable as code).

Run: python notebooks/make_quickstart.py
"""

import pathlib

import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))
code = lambda s: cells.append(nbf.v4.new_code_cell(s.strip()))

md("""
# fq-jax quickstart: prune, focus, quantize, compress

This walk-through runs top to bottom on a CPU in about a minute. It loads the
pretrained CIFAR-10 ResNet-20 from `../shared` (or, when that folder is absent,
trains the small digits CNN for a few seconds), prunes it, fits the per-layer
Gaussian mixtures, shows what Focused Quantization does to each layer, and
writes a real compressed `.fqz` file.
""")
code("""
import os, pathlib, tempfile, time
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
import fq_jax as fq
from fq_jax import models, plotting
from fq_jax.data import common

FAST = os.environ.get("FQ_QUICKSTART_FAST") == "1"  # the test suite's fast path
weights = common.shared_dir() / "models" / "resnet20-cifar10.npz"
cifar = common.shared_dir() / "data" / "cifar10-jpeg.tar.gz"
print("shared weights present:", weights.exists())
""")
md("## 1. A pretrained model")
code("""
if weights.exists():
    from fq_jax.models.torch_import import import_torch_cifar_resnet
    depth, variables = import_torch_cifar_resnet(weights)
    model = models.get_model("cifar_resnet", depth=depth)
    name = f"ResNet-{depth} (CIFAR-10)"
    if cifar.exists():
        from fq_jax.data.cifar10 import load_cifar10
        test_x, test_y = load_cifar10(cifar).test
    else:
        test_x = test_y = None
else:  # no ../shared: train the embedded digits CNN briefly
    from fq_jax.data.digits import load_digits
    data = load_digits()
    model = models.get_model("digits_cnn")
    variables = model.init(jax.random.key(0), data.train[0][:1], train=False)
    tx = optax.adam(3e-3)
    opt = tx.init(variables["params"])

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
        (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), upd["batch_stats"], opt

    params, stats = variables["params"], variables["batch_stats"]
    for epoch in range(3):
        for b in common.epoch_batches(*data.train, 64, epoch=epoch, seed=0):
            params, stats, opt = step(params, stats, opt, b["image"], b["label"])
    variables = {"params": params, "batch_stats": stats}
    test_x, test_y = data.test
    name = "digits CNN"

@jax.jit
def predict(variables, x):
    return jnp.argmax(model.apply(variables, x, train=False), -1)

def accuracy(variables, limit=2000 if FAST else None):
    if test_x is None:
        return float("nan")
    x, y = test_x[:limit], test_y[:limit]
    hits = sum(int(jnp.sum(predict(variables, x[i:i + 500]) == y[i:i + 500])) for i in range(0, len(x), 500))
    return hits / len(x)

print(name, "dense accuracy:", accuracy(variables))
""")
md("""
## 2. Prune half of every convolution and dense kernel

`fq.magnitude_masks` works on the whole parameter tree; rules (regexes on the
'/'-joined path) choose which leaves are compressed. Here the first
convolution stays dense and gets 8 bits: one line of configuration.
""")
code("""
# The first convolution (conv_init in the ResNet, conv1 in the digits CNN)
# stays dense at 8 bits: one line of configuration.
rules = (fq.Rule(pattern=r"^(conv_init|conv1)/kernel$", bits=8, sparsity=0.0), *fq.DEFAULT_RULES)
params = variables["params"]
masks = fq.magnitude_masks(params, 0.5, rules=rules)
params = fq.apply_masks(params, masks)
print(f"sparsity over compressed kernels: {fq.sparsity_of(masks):.1%}")
""")
md("""
## 3. Fit the mixtures and choose each layer's quantizer

`fq.focused_quantization` wraps any optax optimizer; its state holds each
layer's `FocusState` (mixture, Wasserstein separation, recentralized or shift,
power-of-two means, shared sigma, bias, sampled assignments). Initialising it is
post-training quantization; fine-tuning would continue with `tx.update`.
""")
code("""
tx = fq.focused_quantization(optax.sgd(1e-3, momentum=0.9), bits=5, w_sep=2.0, rules=rules)
t = time.perf_counter()
fq_state = tx.init(params)
print(f"mixtures fitted for all layers in {time.perf_counter() - t:.2f} s (incl. compilation)")
rows = fq.layer_report(params, fq_state)
print(fq.format_report(rows))
""")
md("## 4. What a layer looks like: weights, the fitted Gaussians, the quantization levels")
code("""
paths = [r["path"] for r in rows]
picks = [paths[len(paths) // 4], paths[len(paths) // 2], paths[-2]]
fig, axes = plt.subplots(len(picks), 1, figsize=(7, 2.6 * len(picks)))
flat_params = {p: w for p, w in zip(jax.tree.leaves(fq.leaf_paths(params)), jax.tree.leaves(params))}
flat_focus = dict(zip(
    [r["path"] for r in rows],
    [f for f in jax.tree.leaves(fq_state.focus, is_leaf=lambda x: isinstance(x, fq.FocusState))]))
for ax, p in zip(axes, picks):
    plotting.plot_layer(flat_params[p], flat_focus[p], title=p, ax=ax)
fig.tight_layout()
""")
md("## 5. Which layers are recentralized? Separation per layer against w_sep")
code("""
plotting.plot_separation(rows, w_sep=2.0)
plt.tight_layout()
""")
md("""
## 6. Accuracy after post-training focused quantization

Without fine-tuning, power-of-two levels cost accuracy (their relative
spacing is coarse whatever the bit-width); `train.py` fine-tunes under the INQ
schedule with straight-through gradients to win it back.
""")
code("""
quantized = {**variables, "params": fq.quantized(params, fq_state)}
print("pruned + 5-bit FQ, no fine-tuning:", accuracy(quantized))
""")
md("""
## 7. Write the compressed file and account for every byte

The ratio counts every array the file rebuilds (parameters and batch
statistics) at 4 bytes each, over the file's size on disk.
""")
code("""
out = pathlib.Path(tempfile.mkdtemp()) / "model.fqz"
nbytes = fq.save_fqz(out, {**variables, "params": params}, fq_state, metadata={"model": name})
summary = fq.artifact_summary(out.read_bytes())
print(f"{out}: {out.stat().st_size:,} bytes on disk (save_fqz said {nbytes:,})")
print(f"compression ratio {summary['compression_ratio']:.2f}x, "
      f"paper-style (kernels only) {summary['paper_style_compression_ratio']:.2f}x")
decoded = fq.load_fqz(out)
rebuilt = decoded.tree()
same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
    jax.tree.leaves(rebuilt["params"]), jax.tree.leaves(fq.quantized(params, fq_state))))
print("decoded parameters equal the forward-pass parameters bit for bit:", same)
""")
code("""
print(f"{'path':<34} {'kept':>7} {'bytes':>8} {'bits/kept':>9}")
for layer in summary["layers"]:
    if layer.get("kept") is not None and layer.get("section_bytes"):
        print(f"{layer['path'][-34:]:<34} {layer['kept']:>7} {layer['section_bytes']:>8} "
              f"{layer.get('bits_per_kept', float('nan')):>9.3f}")
""")

nb = nbf.v4.new_notebook(
  cells=cells,
  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
)
path = pathlib.Path(__file__).with_name("quickstart.ipynb")
nbf.write(nb, path)
print("wrote", path)
