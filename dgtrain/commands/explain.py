"""`dgtrain explain RUN_DIR`: why the model says what it says, as files under `RUN_DIR/explain/`.

- image models (convnet, or an mlp on images): saliency (|d logit / d pixel|, the largest over channels)
  and integrated gradients (Sundararajan et al. 2017: the path integral of the gradient from a baseline,
  here the all-zero input, i.e. the training mean after normalisation) for a few validation images. Each
  map is saved as a PNG of the image's own size (`saliency_<i>.png`, `ig_<i>.png`), plus one overview
  figure (`images.png`) and the numbers (`explain.json`).
- transformer: attention weights of one validation example, one PNG per layer and head.
- tabular models (linreg, mlp): attributions per (standardised) feature: the weights of linreg, and
  integrated gradients for both, averaged in absolute value over the validation split (`features.png`).

Integrated gradients are computed here (a few lines); Captum's IntegratedGradients computes the same
quantity, and is not needed. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from dgtrain.commands import add_run_options
from dgtrain.errors import DgtrainError

# the files explain writes (and replaces: nothing else in the folder is touched)
OUTPUT_NAMES = re.compile(
    r"(saliency|ig)_\d+\.png|attention_(encoder|decoder)_layer\d+_head\d+\.png|(images|features)\.png|explain\.json"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgtrain explain",
        description="Saliency and integrated gradients (image models), attention maps (transformer), "
        "feature attributions (tabular models), written under RUN_DIR/explain/.",
    )
    p.add_argument("source", help="a run directory, a checkpoint (.pt) or a model.safetensors")
    p.add_argument("--num", type=int, default=4, help="validation images to explain (default: 4)")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (default: 32)")
    p.add_argument("--index", type=int, default=0, help="transformer: the validation example (default: 0)")
    p.add_argument("--out", default=None, metavar="DIR", help="default: RUN_DIR/explain")
    add_run_options(p)
    return p


# --------------------------------------------------------------------------------------- attributions


def saliency(model, x, target):
    """(N, C, H, W) inputs, (N,) classes -> (N, H, W): |d logit_target / d x|, the largest over channels."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        out.gather(1, target[:, None]).sum().backward()
    return x.grad.abs().amax(dim=1)


def integrated_gradients(model, x, target, steps: int = 32, baseline=None):
    """Attributions with the shape of x: (x - baseline) times the mean gradient of output `target` along
    the straight path from the baseline to x (midpoint rule). They sum to about f(x) - f(baseline).
    target: (N,) output indices (classes, or the regression output)."""
    import torch

    baseline = torch.zeros_like(x) if baseline is None else baseline
    total = torch.zeros_like(x)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        xi = (baseline + alpha * (x - baseline)).detach().requires_grad_(True)
        with torch.enable_grad():
            model(xi).gather(1, target[:, None]).sum().backward()
        total += xi.grad
    return (x - baseline) * total / steps


# --------------------------------------------------------------------------------------------- writers


def _grey_png(path: Path, m) -> None:
    """A (H, W) map as a greyscale PNG of exactly that size (brightest = largest)."""
    import numpy as np
    from PIL import Image

    a = m.detach().cpu().float().numpy()
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    Image.fromarray((a * 255).round().astype(np.uint8), mode="L").save(path)


def _pyplot():
    from dgtrain.loggers.plots import pyplot as plt

    return plt()


def explain_images(run, out: Path, num: int, steps: int) -> tuple[list[Path], dict[str, Any]]:
    import torch

    model, device = run.model, run.device
    xs, ys = [], []
    for xb, yb in run.setup.val_loader:  # as many batches as --num takes (it was cut to the first one)
        xs.append(xb)
        ys.append(yb)
        if sum(len(b) for b in xs) >= num:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    if len(x) < num:
        raise DgtrainError(f"--num={num}: the validation split has {len(x)} images; give at most that many.")
    x, y = x[:num].to(device), y[:num].to(device)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    sal = saliency(model, x, pred)
    ig = integrated_gradients(model, x, pred, steps)
    with torch.no_grad():  # completeness: attributions add up to f(x) - f(baseline)
        gap = (
            model(x).gather(1, pred[:, None])[:, 0]
            - model(torch.zeros_like(x)).gather(1, pred[:, None])[:, 0]
        )
    completeness = (ig.flatten(1).sum(1) - gap).abs().max().item()
    names = run.extra.get("class_names") or [str(i) for i in range(int(run.info.get("num_classes") or 0))]
    files: list[Path] = []
    for i in range(len(x)):
        for name, m in (("saliency", sal[i]), ("ig", ig[i].sum(0).clamp_min(0))):
            f = out / f"{name}_{i}.png"
            _grey_png(f, m)
            files.append(f)
    plt = _pyplot()
    fig, axes = plt.subplots(3, len(x), figsize=(2.2 * len(x), 6.6), squeeze=False)
    for i in range(len(x)):
        img = x[i].detach().cpu()
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
        axes[0, i].imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(), cmap="gray")
        axes[0, i].set_title(f"true {names[int(y[i])]}\npred {names[int(pred[i])]}", fontsize=8)
        axes[1, i].imshow(sal[i].cpu().numpy(), cmap="hot")
        axes[2, i].imshow(ig[i].sum(0).detach().cpu().numpy(), cmap="bwr")
        for r in range(3):
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
    axes[1, 0].set_ylabel("saliency")
    axes[2, 0].set_ylabel("integrated gradients")
    fig.tight_layout()
    f = out / "images.png"
    fig.savefig(f, dpi=100)
    plt.close(fig)
    files.append(f)
    info = {
        "examples": [
            {
                "true": names[int(y[i])],
                "pred": names[int(pred[i])],
                "saliency": f"saliency_{i}.png",
                "ig": f"ig_{i}.png",
            }
            for i in range(len(x))
        ],
        "ig_steps": steps,
        "ig_baseline": "zeros (the training mean after normalisation)",
        "ig_completeness_max_error": completeness,
    }
    return files, info


def _token_labels(run, tokens: list[int]) -> list[str]:
    extra = run.extra
    if run.info["task"] == "lm" and extra.get("level", "char") == "char" and extra.get("vocab"):
        return [repr(extra["vocab"][t])[1:-1] or " " for t in tokens]
    if run.info["task"] == "lm" and extra.get("level") == "byte":
        return [repr(chr(t))[1:-1] if 32 <= t < 127 else f"x{t:02x}" for t in tokens]
    if run.info["task"] == "lm":  # data=tokens: ids of a tokenizer dgtrain does not keep
        return [str(t) for t in tokens]
    first = int(extra.get("first_symbol", 3))
    special = {
        run.info.get("pad_id"): "<pad>",
        run.info.get("bos_id"): "<bos>",
        run.info.get("eos_id"): "<eos>",
    }
    return [special.get(t, str(t - first)) for t in tokens]


def explain_attention(run, out: Path, index: int) -> tuple[list[Path], dict[str, Any]]:
    model, device = run.model, run.device
    val = run.setup.data.val
    if not 0 <= index < len(val):
        raise DgtrainError(
            f"--index={index}: the validation split has {len(val)} examples (0..{len(val) - 1})."
        )
    src, tgt = val[index]
    if run.info["task"] == "seq2seq":
        pad = run.info.get("pad_id")
        src = src[src != pad] if pad is not None else src
        tgt = tgt[tgt != pad] if pad is not None else tgt
        maps = model.attention_maps(src[None].to(device), tgt[None, :-1].to(device))
        labels = {"encoder": (_token_labels(run, src.tolist()),) * 2}
        dec = _token_labels(run, tgt[:-1].tolist())
        labels["decoder"] = (dec, dec)
    else:
        maps = model.attention_maps(src[None].to(device))
        lab = _token_labels(run, src.tolist())
        labels = {"decoder": (lab, lab)}
    plt = _pyplot()
    files: list[Path] = []
    for part, layers in maps.items():
        qs, ks = labels[part]
        for layer, w in enumerate(layers):
            for head in range(w.shape[1]):
                a = w[0, head].detach().cpu().numpy()
                size = max(4.0, 0.14 * len(ks) + 1.5)
                fig, ax = plt.subplots(figsize=(size, size))
                ax.imshow(a, cmap="viridis", vmin=0.0)
                ax.set_title(f"{part} layer {layer} head {head}", fontsize=9)
                ax.set_xlabel("key (attended to)")
                ax.set_ylabel("query")
                ax.set_xticks(range(len(ks)), ks, fontsize=6, rotation=90)
                ax.set_yticks(range(len(qs)), qs, fontsize=6)
                fig.tight_layout()
                f = out / f"attention_{part}_layer{layer}_head{head}.png"
                fig.savefig(f, dpi=100)
                plt.close(fig)
                files.append(f)
    sep = "" if run.info["task"] == "lm" and run.extra.get("level") else " "  # characters or bytes: as text
    text = sep.join(_token_labels(run, src.tolist()))
    return files, {"example": index, "tokens": text, "parts": {k: len(v) for k, v in maps.items()}}


def explain_features(run, out: Path, steps: int) -> tuple[list[Path], dict[str, Any]]:
    import torch

    model, device, extra = run.model, run.device, run.extra
    n_features = int(run.info["in_shape"][0])
    names = extra.get("feature_names") or [f"x{i}" for i in range(n_features)]
    xs = torch.cat([b[0] for b in run.setup.val_loader]).to(device)
    attrs = []
    n_out = model(xs[:1]).shape[1]
    for o in range(n_out):
        target = torch.full((len(xs),), o, dtype=torch.long, device=device)
        attrs.append(integrated_gradients(model, xs, target, steps).abs().mean(0))
    ig = torch.stack(attrs).mean(0).cpu()  # mean |attribution| per feature, over outputs and examples
    result: dict[str, Any] = {
        "features": names,
        "standardised": "x_mean" in extra,
        "mean_abs_ig": dict(zip(names, ig.tolist(), strict=True)),
        "ig_steps": steps,
    }
    linear = getattr(model, "linear", None)
    if isinstance(linear, torch.nn.Linear):
        w = linear.weight.detach().cpu()
        result["weights"] = {
            t: dict(zip(names, row.tolist(), strict=True))
            for t, row in zip(
                extra.get("target_names") or [f"y{j}" for j in range(w.shape[0])], w, strict=True
            )
        }
        result["bias"] = linear.bias.detach().cpu().tolist()
        if "true_weight" in extra:
            result["true_weight"] = extra["true_weight"]
    plt = _pyplot()
    panels = 2 if "weights" in result else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 0.3 * len(names) + 1.8), squeeze=False)
    order = list(range(len(names)))[::-1]
    axes[0, 0].barh([names[i] for i in order], [ig[i].item() for i in order], color="tab:blue")
    axes[0, 0].set_title("mean |integrated gradients| (validation)", fontsize=9)
    if "weights" in result:
        w0 = linear.weight.detach().cpu()[0]
        axes[0, 1].barh(
            [names[i] for i in order], [w0[i].item() for i in order], color="tab:orange", label="learned"
        )
        if "true_weight" in extra:
            tw = extra["true_weight"][0]
            axes[0, 1].scatter(
                [tw[i] for i in order], [names[i] for i in order], color="k", s=12, label="true", zorder=3
            )
            axes[0, 1].legend(fontsize=7)
        axes[0, 1].axvline(0, color="grey", lw=0.5)
        axes[0, 1].set_title(
            "weights" + (" (standardised features)" if result["standardised"] else ""), fontsize=9
        )
    fig.tight_layout()
    f = out / "features.png"
    fig.savefig(f, dpi=100)
    plt.close(fig)
    return [f], result


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.num < 1 or args.steps < 1:
        raise DgtrainError(f"--num={args.num}, --steps={args.steps}: both must be at least 1.")
    from dgtrain.validation import installed

    missing = [
        name for name, module in (("matplotlib", "matplotlib"), ("Pillow", "PIL")) if not installed(module)
    ]
    if missing:  # checked first: a missing one half-way through left some PNGs and a traceback
        raise DgtrainError(
            f"dgtrain explain draws with matplotlib and Pillow; {' and '.join(missing)} not installed here: "
            "pip install 'dgtrain[explain]'."
        )
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise DgtrainError(
            f"--out={args.out} is a file; explain writes a folder (PNGs and explain.json). Give a folder path."
        )
    from dgtrain.runs import load_run, out_dir

    run = load_run(Path(args.source), args.device, tuple(args.allow_target))
    task, in_shape = run.info["task"], tuple(run.info.get("in_shape") or ())
    out = Path(args.out) if args.out else out_dir(run, "explain")
    out.mkdir(parents=True, exist_ok=True)
    # an earlier explain's maps (a larger --num, another model) would pass as this one's
    for old in out.iterdir():
        if OUTPUT_NAMES.fullmatch(old.name) and old.is_file():
            old.unlink()
    if task in ("lm", "seq2seq"):
        files, info = explain_attention(run, out, args.index)
    elif task == "classification" and len(in_shape) == 3:
        files, info = explain_images(run, out, args.num, args.steps)
    elif len(in_shape) == 1:
        files, info = explain_features(run, out, args.steps)
    else:
        raise DgtrainError(f"{args.source}: no explanation for a {task} model on inputs shaped {in_shape}.")
    summary = out / "explain.json"
    summary.write_text(json.dumps({"source": run.weights_name, "task": task, **info}, indent=2) + "\n")
    files.append(summary)
    print(f"dgtrain explain: {len(files)} files in {out}")
    for f in files:
        print(f"  {f}")
    return 0
