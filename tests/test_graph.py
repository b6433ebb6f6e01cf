"""`dgtrain graph`: module-level and autograd diagrams of one real batch, as Mermaid and DOT."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from dgtrain.commands.graph import main
from dgtrain.errors import DgtrainError
from dgtrain.graph import Graph, autograd_graph, to_dot, to_mermaid
from dgtrain.models.mlp import MLP
from dgtrain.telemetry import SavedTensors, parameter_storages
from tests.conftest import run_cli

FAST_MLP = ["model=mlp", "device=cpu", "model.hidden_size=16"]
SMALL_TRANSFORMER = [
    "model=transformer",
    "device=cpu",
    "model.d_model=16",
    "model.n_heads=2",
    "model.n_layers=1",
    "data.num_examples=600",
    "data.batch_size=8",
]


def mermaid_parts(md: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(declared node ids in order, edges) of the ```mermaid block of a Markdown file."""
    block = re.search(r"```mermaid\n(.*?)\n```", md, re.S)
    assert block, md
    lines = block.group(1).splitlines()
    assert lines[0].startswith("flowchart ")
    nodes, edges = [], []
    for line in lines[1:]:
        line = line.strip()
        if m := re.fullmatch(r"(\w+) -->(?:\|\"[^\"]*\"\|)? (\w+)", line):
            edges.append((m.group(1), m.group(2)))
        elif m := re.fullmatch(r"(\w+)(\[\"|\(\[\"|\[/\")(.*)(\"\]|\"\]\)|\"/\])", line):
            nodes.append(m.group(1))
        else:
            assert line.startswith(("classDef ", "class ")), f"unexpected Mermaid line: {line!r}"
    return nodes, edges


def dot_parts(dot: str) -> tuple[set[str], list[tuple[str, str]]]:
    nodes = set(re.findall(r"^  (\w+) \[label=", dot, re.M))
    edges = re.findall(r"^  (\w+) -> (\w+)", dot, re.M)
    return nodes, edges


def test_mlp_diagrams_name_layers_in_order_and_are_well_formed(tmp_path, capsys):
    out = tmp_path / "g"
    assert main([*FAST_MLP, f"graph.out={out}"]) == 0
    nodes, edges = mermaid_parts((out / "modules.md").read_text())
    assert nodes == ["in_0", "m_fc1", "m_sigmoid", "m_fc2", "out"]  # Input -> fc1 -> sigmoid -> fc2 -> Output
    assert edges == [("in_0", "m_fc1"), ("m_fc1", "m_sigmoid"), ("m_sigmoid", "m_fc2"), ("m_fc2", "out")]
    md = (out / "modules.md").read_text()
    assert '"fc1<br/>Linear 64→16"' in md and "Output<br/>" in md

    for stem in ("modules", "autograd_1"):
        nodes, edges = mermaid_parts((out / f"{stem}.md").read_text())
        assert edges and all(a in nodes and b in nodes for a, b in edges), stem
        dnodes, dedges = dot_parts((out / f"{stem}.dot").read_text())
        assert dnodes == set(nodes) and sorted(dedges) == sorted(edges), stem

    report = json.loads((out / "graph.json").read_text())
    (batch,) = report["batches"]
    names = [o["name"] for o in batch["ops"]]
    assert {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} <= set(names)
    assert "SigmoidBackward0" in names and "AddmmBackward0" in names
    # every saved byte the hooks saw is attributed to a node, and parameters are not counted
    assert batch["unattributed_bytes"] == 0
    assert sum(o["saved_bytes"] for o in batch["ops"]) == batch["saved_bytes"] > 0
    printed = capsys.readouterr().out
    assert "fc1  Linear" in printed and "autograd nodes" in printed and "saved for backward" in printed


def test_per_node_saved_bytes_add_up_to_the_hook_count():
    torch.manual_seed(0)
    model = MLP(4, 8, 3)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    with SavedTensors(parameter_storages(model)) as counted:
        loss = F.mse_loss(model(x), y)
    ag = autograd_graph(model, loss, counted)
    assert ag["saved_bytes"] == 360 and ag["unattributed_bytes"] == 0
    by_name = {o.name: o for o in ag["ops"]}
    assert by_name["MseLossBackward0"].saved_bytes == 2 * 5 * 3 * 4  # prediction and target
    # sigmoid's output is saved by sigmoid and by fc2: charged once, to sigmoid, the first to save it
    assert by_name["SigmoidBackward0"].saved_bytes == 5 * 8 * 4
    assert by_name["fc1.weight"].saved_bytes == 0
    assert by_name["fc1.weight"].param and by_name["fc1.weight"].shape == "8×4"


def test_transformer_two_batches_of_different_shapes(tmp_path, capsys):
    out = tmp_path / "t"
    assert main([*SMALL_TRANSFORMER, f"graph.out={out}", "graph.batches=2"]) == 0
    report = json.loads((out / "graph.json").read_text())
    a, b = report["batches"]
    assert a["shapes"] != b["shapes"]
    assert a["saved_bytes"] != b["saved_bytes"]
    (change,) = report["changes"]
    assert change["saved_bytes"] == [a["saved_bytes"], b["saved_bytes"]]
    assert change["same_structure"] and change["shape_changes"] > 0
    for stem in ("autograd_1", "autograd_2", "modules"):
        nodes, edges = mermaid_parts((out / f"{stem}.md").read_text())
        assert all(x in nodes and y in nodes for x, y in edges)
    modules = report["modules"]["nodes"]
    assert [modules[k].split("\n")[0] for k in ("m_encoder_0", "m_decoder_0", "m_head")] == [
        "encoder.0",
        "decoder.0",
        "head",
    ]
    assert "batch 1 → 2: nodes" in capsys.readouterr().out


def test_bad_graph_options_are_clear_errors(tmp_path):
    with pytest.raises(DgtrainError, match="graph.out=DIR, graph.batches=N and graph.depth=D"):
        main([*FAST_MLP, "graph.bogus=1"])
    with pytest.raises(DgtrainError, match="graph.batches=0: must be at least 1"):
        main([*FAST_MLP, "graph.batches=0"])
    with pytest.raises(DgtrainError, match="model/nope"):
        main(["model=nope", f"graph.out={tmp_path}"])


def test_writers_escape_labels():
    g = Graph()
    g.node("a", 'say "hi"\nnext', "io")
    g.node("b", "b")
    g.edge("a", "b", "2×3")
    assert 'a(["say #quot;hi#quot;<br/>next"])' in to_mermaid(g)
    assert 'a [label="say \\"hi\\"\\nnext"' in to_dot(g, "t")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_dot_output_parses_and_renders(tmp_path):
    out = tmp_path / "g"
    assert main([*FAST_MLP, f"graph.out={out}"]) == 0
    for stem in ("modules", "autograd_1"):
        p = subprocess.run(["dot", "-Tcanon", str(out / f"{stem}.dot")], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert (out / f"{stem}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_graph_subcommand(tmp_path):
    p = run_cli(["graph", *FAST_MLP], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "graph_mlp" / "modules.md").exists()
    assert "(model)  MLP" in p.stdout
    bad = run_cli(["graph", "model=mlp", "graph.batches=x"], cwd=tmp_path)
    assert bad.returncode == 2 and "dgtrain graph: error: 'graph.batches=x'" in bad.stderr
