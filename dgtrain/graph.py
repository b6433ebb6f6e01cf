"""The graph that one real batch builds, as pictures (`dgtrain graph`, dgtrain/commands/graph.py).

`draw` writes into `out` (default `./graph_<model>/`):
- `modules.md` / `modules.dot`: the module-level data flow (Input -> fc1 -> sigmoid -> fc2 -> Output),
  traced from a real forward pass; modules nested deeper than `graph.depth` are drawn as one box;
- `autograd_<i>.md` / `.dot` for batch i: every autograd node of the loss's graph with the shape it
  produced and the bytes it saved for backward (each storage counted once, parameters excluded);
- `graph.json`: the same figures, and what changed between batches;
- `.svg` and `.png` next to each `.dot` when Graphviz's `dot` is on PATH.
With `graph.batches=2` or more it picks batches of different shapes where the data has them (the
seq2seq transformer pads each batch to its own longest sequence) and reports what changed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from dgtrain.errors import DgtrainError
from dgtrain.telemetry import (
    SavedTensors,
    autograd_nodes,
    parameter_storages,
    shape_signature,
    storage_key,
    storage_nbytes,
)

MERMAID_EDGE_LIMIT = 500  # GitHub's Mermaid renders at most this many edges
# the files `draw` writes (and replaces: nothing else in the folder is touched)
OUTPUT_NAMES = re.compile(r"(modules|autograd_\d+)\.(md|dot|svg|png)|graph\.json")


def fmt_shape(shape) -> str:
    return "×".join(str(n) for n in shape) if len(shape) else "scalar"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------------------------ a small graph


@dataclass
class Graph:
    """Nodes (id -> label, kind) and edges (src, dst, label): what both the Mermaid and DOT writers draw."""

    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)
    edges: dict[tuple[str, str], str] = field(default_factory=dict)

    def node(self, nid: str, label: str, kind: str = "op") -> str:
        self.nodes[nid] = (label, kind)
        return nid

    def edge(self, src: str, dst: str, label: str = "") -> None:
        self.edges.setdefault((src, dst), label)


def _mermaid_text(s: str) -> str:
    return s.replace('"', "#quot;").replace("\n", "<br/>")


def to_mermaid(g: Graph, direction: str = "TD") -> str:
    shapes = {"io": ('(["', '"])'), "param": ('[/"', '"/]'), "op": ('["', '"]'), "module": ('["', '"]')}
    lines = [f"flowchart {direction}"]
    for nid, (label, kind) in g.nodes.items():
        a, b = shapes.get(kind, shapes["op"])
        lines.append(f"    {nid}{a}{_mermaid_text(label)}{b}")
    for (src, dst), label in g.edges.items():
        lines.append(f'    {src} -->|"{_mermaid_text(label)}"| {dst}' if label else f"    {src} --> {dst}")
    lines.append("    classDef io fill:#e8f1ff,stroke:#4a78c2")
    lines.append("    classDef param fill:#f3f3f3,stroke:#999")
    for kind in ("io", "param"):
        ids = [nid for nid, (_, k) in g.nodes.items() if k == kind]
        if ids:
            lines.append(f"    class {','.join(ids)} {kind}")
    return "\n".join(lines)


def _dot_text(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(g: Graph, name: str, rankdir: str = "TB") -> str:
    style = {
        "io": 'shape=oval, style=filled, fillcolor="#e8f1ff"',
        "param": 'shape=box, style="rounded,filled", fillcolor="#f3f3f3", fontsize=9',
        "op": "shape=box",
        "module": 'shape=box, style="rounded,filled", fillcolor="#fff6e0"',
    }
    lines = [f'digraph "{_dot_text(name)}" {{', f"  rankdir={rankdir};", '  node [fontname="Helvetica"];']
    lines.append('  edge [fontname="Helvetica", fontsize=9];')
    for nid, (label, kind) in g.nodes.items():
        lines.append(f'  {nid} [label="{_dot_text(label)}", {style.get(kind, style["op"])}];')
    for (src, dst), label in g.edges.items():
        lines.append(f'  {src} -> {dst} [label="{_dot_text(label)}"];' if label else f"  {src} -> {dst};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- module-level data flow

# Top-level torch calls that only reshape, select or convert: the data flows through them unchanged
# in meaning, so the diagram draws an edge across them instead of a box.
PASSTHROUGH = {
    "view", "reshape", "flatten", "transpose", "permute", "contiguous", "chunk", "split", "unsqueeze",
    "squeeze", "expand", "__getitem__", "to", "float", "half", "bfloat16", "type_as", "detach", "clone",
    "ne", "eq", "lt", "le", "gt", "ge", "__ne__", "__eq__", "__lt__", "__le__", "__gt__", "__ge__",
    "size", "dim", "numel", "__len__", "__get__", "__set__", "__format__", "__repr__", "tolist", "item",
}  # fmt: skip


class _FunctionTrace(TorchFunctionMode):
    def __init__(self, tracer: ModuleTracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tracer.on_function(func, args, kwargs or {}, out)
        return out


class ModuleTracer:
    """Traces one forward pass: calls of modules (a leaf, or `depth` levels deep) and of torch functions
    made outside any such module, joined by the tensors that flow between them."""

    def __init__(self, model: nn.Module, depth: int = 2):
        self.model, self.depth = model, depth
        self.names = {m: n for n, m in model.named_modules()}
        self.graph = Graph()
        self.producers: dict[int, set[str]] = {}  # id(tensor) -> the boxes it came from
        self.keep: list[torch.Tensor] = []  # keeps traced tensors alive, so their ids stay unique
        self.inside_root = False
        self.unit_depth = 0  # > 0 while a drawn module runs (its insides are not drawn)
        self.calls: Counter[str] = Counter()
        self.shapes: dict[str, str] = {}  # module name -> output shape, for the console tree

    def is_unit(self, module: nn.Module) -> bool:
        name = self.names.get(module, "")
        if not name:
            return False
        return not any(True for _ in module.children()) or name.count(".") + 1 >= self.depth

    def _tensors(self, *trees) -> list[torch.Tensor]:
        leaves, _ = tree_flatten(trees)
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    def _new_box(self, base: str, label: str, kind: str) -> str:
        self.calls[base] += 1
        n = self.calls[base]
        nid = "m_" + "".join(c if c.isalnum() else "_" for c in base) + (f"_{n}" if n > 1 else "")
        return self.graph.node(nid, label + (f" (call {n})" if n > 1 else ""), kind)

    def _connect(self, nid: str, inputs: list[torch.Tensor]) -> None:
        for t in inputs:
            for src in self.producers.get(id(t), ()):
                self.graph.edge(src, nid, fmt_shape(t.shape))

    def _produce(self, outputs: list[torch.Tensor], srcs: set[str]) -> None:
        for t in outputs:
            self.producers[id(t)] = set(srcs)
            self.keep.append(t)

    # hooks
    def root_pre(self, module, args, kwargs):
        self.inside_root = True
        params = list(inspect.signature(module.forward).parameters)
        for i, t in enumerate(args):
            if isinstance(t, torch.Tensor):
                name = params[i] if i < len(params) else f"input{i}"
                nid = self.graph.node(f"in_{i}", f"Input {name}\n{fmt_shape(t.shape)}", "io")
                self._produce([t], {nid})

    def root_post(self, module, args, kwargs, output):
        self.inside_root = False
        outs = self._tensors(output)
        nid = self.graph.node("out", "Output\n" + ", ".join(fmt_shape(t.shape) for t in outs), "io")
        self._connect(nid, outs)

    def unit_pre(self, module, args, kwargs):
        if self.inside_root and self.unit_depth == 0:
            name = self.names[module]
            extra = ""
            if isinstance(module, nn.Linear):
                extra = f" {module.in_features}→{module.out_features}"
            elif isinstance(module, nn.Conv2d):
                extra = (
                    f" {module.in_channels}→{module.out_channels}, {'×'.join(map(str, module.kernel_size))}"
                )
            nid = self._new_box(name, f"{name}\n{type(module).__name__}{extra}", "module")
            self._connect(nid, self._tensors(args, kwargs))
            self._current = nid
        self.unit_depth += 1

    def unit_post(self, module, args, kwargs, output):
        self.unit_depth -= 1
        if self.inside_root and self.unit_depth == 0:
            outs = self._tensors(output)
            self._produce(outs, {self._current})
            if outs:
                self.shapes[self.names[module]] = fmt_shape(outs[0].shape)

    def on_function(self, func, args, kwargs, out) -> None:
        if not self.inside_root or self.unit_depth:
            return
        outs = self._tensors(out)
        if not outs:
            return
        name = getattr(func, "__name__", str(func))
        ins = self._tensors(args, kwargs)
        srcs = set().union(*(self.producers.get(id(t), set()) for t in ins)) if ins else set()
        if name in PASSTHROUGH and ins:
            self._produce(outs, srcs)
            return
        nid = self._new_box(name, name, "op")
        self._connect(nid, ins)
        self._produce(outs, {nid})

    def trace(self, run) -> Graph:
        handles = [
            self.model.register_forward_pre_hook(self.root_pre, with_kwargs=True),
            self.model.register_forward_hook(self.root_post, with_kwargs=True),
        ]
        for m in self.model.modules():
            if m is not self.model and self.is_unit(m):
                handles.append(m.register_forward_pre_hook(self.unit_pre, with_kwargs=True))
                handles.append(m.register_forward_hook(self.unit_post, with_kwargs=True))
        try:
            with _FunctionTrace(self):
                run()
        finally:
            for h in handles:
                h.remove()
            self.keep.clear()
        return self.graph


# ------------------------------------------------------------------------------ op-level autograd


def saved_tensors_of(node) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for what an autograd node saved for backward, read from its `_saved_*` fields."""
    out = []
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attr)
        except RuntimeError:  # already freed by a backward pass
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                out.append((attr[len("_saved_") :] + (f"[{i}]" if len(values) > 1 else ""), v))
    if not out and hasattr(node, "saved_tensors"):  # custom autograd.Function nodes
        with contextlib.suppress(RuntimeError):
            out = [(f"saved[{i}]", t) for i, t in enumerate(node.saved_tensors) if t is not None]
    return out


@dataclass
class OpNode:
    nid: str
    name: str  # AddmmBackward0, or the parameter's name for AccumulateGrad
    shape: str  # what the forward op produced
    saved_bytes: int  # storages this node is the first to save (parameters excluded)
    saved: list[str]  # "mat1 832×64 float32"
    param: bool = False


def autograd_graph(model: nn.Module, loss: torch.Tensor, counted: SavedTensors) -> dict[str, Any]:
    """The op-level graph of `loss`, from the same forward whose saved tensors `counted` saw."""
    param_names = {id(p): n for n, p in model.named_parameters()}
    exclude = parameter_storages(model)
    nodes = autograd_nodes(loss.grad_fn)
    ids = {node: f"n{i}" for i, node in enumerate(nodes)}
    claimed: set = set()
    ops: list[OpNode] = []
    # Walk from the inputs towards the loss (reverse breadth-first order), so a tensor saved by two
    # nodes (sigmoid's output, saved by sigmoid and by the next layer) is charged to the first one.
    for node in reversed(nodes):
        meta = getattr(node, "_input_metadata", ())
        shape = fmt_shape(meta[0].shape) if meta else ""
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: where a parameter's gradient lands
            ops.append(OpNode(ids[node], param_names.get(id(var), "leaf"), fmt_shape(var.shape), 0, [], True))
            continue
        nbytes, saved = 0, []
        for attr, t in saved_tensors_of(node):
            key = storage_key(t)
            note = ""
            if key in exclude:
                note = " (parameter)"
            elif key not in claimed:
                claimed.add(key)
                nbytes += storage_nbytes(t)
            else:
                note = " (shared)"
            saved.append(f"{attr} {fmt_shape(t.shape)} {str(t.dtype).removeprefix('torch.')}{note}")
        ops.append(OpNode(ids[node], node.name(), shape, nbytes, saved))
    ops.reverse()  # back to the order of `nodes`: the loss first
    edges = [(ids[child], ids[node]) for node in nodes for child, _ in node.next_functions if child in ids]
    attributed = sum(o.saved_bytes for o in ops)
    return {
        "ops": ops,
        "edges": edges,
        "nodes": len(nodes),
        "saved_bytes": counted.nbytes,
        "unattributed_bytes": counted.nbytes - attributed,  # saved where no node exposes it (rare)
        "saved_tensors": counted.tensors,
    }


def op_graph(ag: dict[str, Any]) -> Graph:
    g = Graph()
    for o in ag["ops"]:
        if o.param:
            g.node(o.nid, f"{o.name}\n{o.shape}", "param")
        else:
            label = o.name + (f"\n{o.shape}" if o.shape else "")
            if o.saved_bytes:
                label += f"\nsaved {fmt_bytes(o.saved_bytes)}"
            g.node(o.nid, label, "op")
    for src, dst in ag["edges"]:
        g.edge(src, dst)
    return g


# ------------------------------------------------------------------- drawing one config's graphs


def compose_config(overrides: list[str]):
    """The training config exactly as `dgtrain OVERRIDES` would see it, and Hydra's group choices."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from dgtrain.config import register_schema
    from dgtrain.paths import config_dir

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise DgtrainError(f"{e} (overrides: {' '.join(overrides) or 'none'})") from e
    finally:
        GlobalHydra.instance().clear()
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg, choices


def pick_batches(loader, n: int, search: int = 200) -> list:
    """The first batch, then batches whose shapes differ from all picked so far (consecutive ones when
    every batch has the same shape), looking at most `search` batches ahead."""
    loader.batch_sampler.set_epoch(0, 0)
    picked, seen, rest = [], set(), []
    for i, batch in enumerate(loader):
        sig = shape_signature(batch)
        if sig not in seen:
            picked.append(batch)
            seen.add(sig)
        elif len(rest) < n:
            rest.append(batch)
        if len(picked) == n or i + 1 >= search:
            break
    return (picked + rest)[:n]


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What changed from graph a to graph b: node counts by op, output shapes, saved bytes."""
    names_a = [o.name for o in a["ops"]]
    names_b = [o.name for o in b["ops"]]
    out: dict[str, Any] = {
        "nodes": [a["nodes"], b["nodes"]],
        "saved_bytes": [a["saved_bytes"], b["saved_bytes"]],
        "same_structure": names_a == names_b,
    }
    if names_a == names_b:
        changed = [
            (o.name, o.shape, p.shape) for o, p in zip(a["ops"], b["ops"], strict=True) if o.shape != p.shape
        ]
        out["shape_changes"] = len(changed)
        out["examples"] = [f"{n}: {s} → {t}" for n, s, t in changed[:5]]
    else:
        ca, cb = Counter(n for n in names_a), Counter(n for n in names_b)
        out["op_count_changes"] = {k: [ca[k], cb[k]] for k in sorted(set(ca) | set(cb)) if ca[k] != cb[k]}
    return out


def render(dot_file: Path) -> list[Path]:
    """SVG and PNG next to a .dot file when Graphviz is installed; nothing otherwise."""
    exe = shutil.which("dot")
    if exe is None:
        return []
    made = []
    for fmt in ("svg", "png"):
        target = dot_file.with_suffix(f".{fmt}")
        subprocess.run([exe, f"-T{fmt}", str(dot_file), "-o", str(target)], check=True, timeout=120)
        made.append(target)
    return made


def module_tree(model: nn.Module, shapes: dict[str, str], max_depth: int) -> list[str]:
    """'fc1  Linear  4,160 params  → 64×64' for each module down to `max_depth`, indented by depth."""
    lines = []
    for name, m in model.named_modules():
        depth = name.count(".") + 1 if name else 0
        if depth > max_depth:
            continue
        n_params = sum(p.numel() for p in m.parameters())
        shape = f"  → {shapes[name]}" if name in shapes else ""
        lines.append(f"{'  ' * depth}{name or '(model)'}  {type(m).__name__}  {n_params:,} params{shape}")
    return lines


@dataclass
class Drawing:
    """What `draw` made: the model, each module's output shape, the autograd graph of each batch, what
    changed between consecutive batches, and the files written."""

    model: nn.Module
    shapes: dict[str, str]
    graphs: list[dict[str, Any]]
    changes: list[dict[str, Any]]
    written: list[Path]


def draw(cfg, choices: dict[str, str], out: str | None = None, batches: int = 1, depth: int = 2) -> Drawing:
    """Build the model and data of `cfg`, run `batches` real batches and write the module diagram, each
    batch's autograd graph and graph.json into `out` (default ./graph_<model>)."""
    from dgtrain.train import autocast_for, precision_of, seed_everything, setup

    seed_everything(cfg.seed)
    s = setup(cfg)
    autocast = autocast_for(s.device, precision_of(cfg))
    model_name = choices.get("model") or type(s.model).__name__.lower()
    folder = Path(out or f"graph_{model_name}")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # an earlier drawing's files (more batches) would pass as this one's
        if OUTPUT_NAMES.fullmatch(old.name) and old.is_file():
            old.unlink()
    picked = [tuple(t.to(s.device) for t in b) for b in pick_batches(s.train_loader, batches)]
    s.model.train()  # the graph a training step builds (dropout included)

    def forward(batch):
        with autocast():
            return s.task.loss(s.model, batch, s.loss_fn)

    written: list[Path] = []
    tracer = ModuleTracer(s.model, depth)
    mod_graph = tracer.trace(lambda: forward(picked[0]))
    written += write_pair(folder / "modules", mod_graph, f"{model_name}: modules", "LR", picked[0])

    graphs = []
    for i, batch in enumerate(picked, 1):
        with SavedTensors(parameter_storages(s.model)) as counted:
            loss = forward(batch)
        ag = autograd_graph(s.model, loss, counted)
        ag["shapes"] = shape_signature(batch)
        graphs.append(ag)
        written += write_pair(
            folder / f"autograd_{i}", op_graph(ag), f"{model_name}: autograd, batch {i}", "TB", batch
        )
        del loss

    changes = [compare(graphs[i - 1], graphs[i]) for i in range(1, len(graphs))]
    report = {
        "model": model_name,
        "device": str(s.device),
        "batches": [
            {
                "shapes": g["shapes"],
                "nodes": g["nodes"],
                "saved_bytes": g["saved_bytes"],
                "saved_tensors": g["saved_tensors"],
                "unattributed_bytes": g["unattributed_bytes"],
                "ops": [
                    {
                        "id": o.nid,
                        "name": o.name,
                        "shape": o.shape,
                        "saved_bytes": o.saved_bytes,
                        "saved": o.saved,
                    }
                    for o in g["ops"]
                ],
                "edges": g["edges"],
            }
            for g in graphs
        ],
        "modules": {
            "nodes": {k: v[0] for k, v in mod_graph.nodes.items()},
            "edges": [list(e) for e in mod_graph.edges],
        },
        "changes": changes,
    }
    (folder / "graph.json").write_text(json.dumps(report, indent=1) + "\n")
    written.append(folder / "graph.json")
    return Drawing(s.model, tracer.shapes, graphs, changes, written)


def write_pair(stem: Path, g: Graph, title: str, direction: str, batch) -> list[Path]:
    md = stem.with_suffix(".md")
    note = ""
    if len(g.edges) > MERMAID_EDGE_LIMIT:
        note = (
            f"\n> This graph has {len(g.edges)} edges; GitHub's Mermaid draws at most {MERMAID_EDGE_LIMIT}. "
            f"Open `{stem.name}.svg` (written when Graphviz is installed) or render `{stem.name}.dot`.\n"
        )
    mermaid_dir = "LR" if direction == "LR" else "TD"
    md.write_text(
        f"# {title}\n\nBatch shapes: `{shape_signature(batch)}`. {len(g.nodes)} nodes, {len(g.edges)} edges.\n"
        f"{note}\n```mermaid\n{to_mermaid(g, mermaid_dir)}\n```\n"
    )
    dot = stem.with_suffix(".dot")
    dot.write_text(to_dot(g, title, "LR" if direction == "LR" else "TB"))
    return [md, dot, *render(dot)]
