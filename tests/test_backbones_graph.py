"""PyTorch Geometric graph networks: the structure map's sites on GCN / GAT / GIN / SAGE
layers, its default targets, training and merging, and the refusals."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import unipeft
from unipeft.contract.errors import PluginError, TargetError
from unipeft.contract.maps import weight_ref
from unipeft.maps.graph import GRAPH_MAP
from unipeft.runtime.registry import registry
from unipeft.testing.backbones import BACKBONES

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import MLP, GATConv, GCNConv, GINConv, SAGEConv  # noqa: E402

GNN = BACKBONES["gnn"]


class NodeClassifier(nn.Module):
    """A PyG model as usually written: sparse layers on one disjoint union of graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [GATConv(6, 8, heads=2), SAGEConv(16, 16), GINConv(MLP([16, 32, 16], norm=None))]
        )
        self.classifier = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x, edge_index))
        return self.classifier(x)


def _graph_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=gen)
    edges = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 1], [1, 2, 0, 4, 5, 3, 7, 8, 6, 0]])
    return x, edges


def _roles(sites) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for site in sites:
        if site.role:
            out.setdefault(site.role, []).append(site.name)
    return out


def test_tiny_gnn_sites_per_layer() -> None:
    model = GNN.make()
    roles = _roles(unipeft.inspect_sites(model))
    assert roles["gnn.lin"] == ["convs.0.lin", "convs.1.lin"]
    assert roles["gnn.mlp"] == ["convs.2.nn.0", "convs.2.nn.2"]
    assert roles["block"] == ["convs.0:block", "convs.1:block", "convs.2:block"]
    assert roles["head"] == ["head"]
    sites = {s.name: s for s in GRAPH_MAP.sites(model)}
    assert [sites[n].layer for n in ("convs.0.lin", "convs.1.lin", "convs.2.nn.2")] == [0, 1, 2]
    lin = sites["convs.0.lin"]
    assert lin.weight is not None and (lin.in_features, lin.features) == (8, 16)
    assert all(sites[f"convs.{i}:block"].features == 16 for i in range(3))


def test_pyg_linear_is_a_projection_and_a_lazy_one_is_not() -> None:
    ref = weight_ref(GCNConv(5, 7).lin)
    assert ref is not None and (ref.layout, ref.in_features, ref.out_features) == ("linear", 5, 7)
    assert weight_ref(GCNConv(-1, 7).lin) is None


def test_a_realistic_sparse_model_gat_sage_gin() -> None:
    model = NodeClassifier()
    sites = {s.name: s for s in GRAPH_MAP.sites(model)}
    roles = _roles(sites.values())
    assert roles["gnn.lin"] == ["convs.0.lin", "convs.1.lin_l", "convs.1.lin_r"]
    assert roles["gnn.mlp"] == ["convs.2.nn.lins.0", "convs.2.nn.lins.1"]
    assert roles["head"] == ["classifier"]
    assert sites["convs.0:block"].features == 16  # two heads of 8, concatenated
    assert sites["convs.2:block"].features == 16  # the MLP's last projection
    bipartite = GRAPH_MAP.sites(GATConv((4, 6), 8))
    assert [s.name for s in bipartite if s.role == "gnn.lin"] == ["lin_src", "lin_dst"]


@pytest.mark.parametrize(("method", "config"), [("lora", {"r": 2}), ("ia3", {}), ("ssf", {})])
def test_sparse_layers_train_and_merge(method: str, config: dict) -> None:
    torch.manual_seed(0)
    model = unipeft.apply(NodeClassifier(), method, **config)
    reached = {s.role for s in model.adapters["default"].sites}
    assert reached == {"gnn.lin", "gnn.mlp"}
    x, edges = _graph_batch()
    with torch.no_grad():
        base = model(x, edges)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(x, edges).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = model(x, edges)
        assert not torch.allclose(trained, base)
        model.merge()
        torch.testing.assert_close(model(x, edges), trained, atol=1e-5, rtol=1e-4)


def test_lora_on_gcn_matches_a_hand_written_update() -> None:
    """LoRA on ``GCNConv.lin`` equals the same layer with ``W + scale * B @ A``."""
    torch.manual_seed(0)
    conv = GCNConv(6, 5)
    x, edges = _graph_batch()
    reference = GCNConv(6, 5)
    reference.load_state_dict(conv.state_dict())
    model = unipeft.apply(conv, "lora", r=2, alpha=6, targets=["gnn.lin"])
    delta = model.adapters["default"].delta_at("lin")
    for p in delta.parameters():
        nn.init.normal_(p, std=0.3)
    a, b = (p for _, p in sorted(delta.named_parameters()))  # lora_A (r, in), lora_B (out, r)
    with torch.no_grad():
        reference.lin.weight += 3.0 * b @ a
        torch.testing.assert_close(model(x, edges), reference(x, edges))


def test_default_targets_and_an_adapter_per_layer_save_and_load(tmp_path: Path) -> None:
    lora = unipeft.apply(GNN.make(), "lora", r=2)
    assert lora.adapters["default"].targets == ["gnn.lin", "gnn.mlp?"]
    model = unipeft.apply(GNN.make(), "bottleneck_adapter", bottleneck=4)
    assert [s.role for s in model.adapters["default"].sites] == ["block"] * 3
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    x = GNN.sample(0)
    with torch.no_grad():
        out = GNN.run(model, x)
        assert not torch.allclose(out, GNN.run(GNN.make(), x))
    model.save(tmp_path)
    loaded = unipeft.load(GNN.make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(GNN.run(loaded, x), out)


def test_mixed_batches_route_per_graph_in_static_mode_only() -> None:
    model = unipeft.apply(GNN.make(), "lora", r=2)
    model.add_adapter("other", "lora", r=2)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.2)
    x = GNN.sample(0)
    with torch.no_grad():
        model.set_active("other")
        other = model(x["x"])
        model.set_active("default")
        mine = model(x["x"])
        with model.mixed_batch(["other", "default"]):
            mixed = model(x["x"])
    for k in range(2):  # node features and logits: sample 0 as "other", sample 1 as "default"
        torch.testing.assert_close(mixed[k][0], other[k][0])
        torch.testing.assert_close(mixed[k][1], mine[k][1])
    # a disjoint union has nodes, not graphs, as rows: the routing says so
    sparse = unipeft.apply(NodeClassifier(), "lora", r=2)
    sparse.add_adapter("other", "lora", r=2)
    x, edges = _graph_batch()
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries but the batch at .* 9"):
        with sparse.mixed_batch(["other", "default"]):
            sparse(x, edges)


def test_lazy_layers_are_refused_naming_the_layer() -> None:
    # strict plugins (UNIPEFT_STRICT_PLUGINS, as the test run sets it) raise the map's error;
    # otherwise the map is skipped, the generic map finds no role, and the registry records
    # the error (it warns once per failure and process)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises((TargetError, PluginError)) as info:
            unipeft.apply(_Lazy(), "lora")
    if isinstance(info.value, PluginError):
        errors = [str(info.value)]
    else:
        errors = [f.error for f in registry().failures]
    assert any("lazily initialised projection 'convs.0.lin'" in e for e in errors), errors


class _Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([GCNConv(-1, 8)])

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.convs[0](x, edge_index)


@pytest.mark.parametrize(
    ("method", "targets", "message"),
    [
        ("lora", ["block"], r"projection sites and 'convs.0:block' is a module site"),
        ("prompt_tuning", None, r"'tokens' matches nothing on TinyGNN"),
        ("ln_tuning", ["block"], "GCNConv"),
    ],
)
def test_refusals_name_the_site_kind(method: str, targets, message: str) -> None:
    backbone = GNN.make()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(TargetError, match=message):
        unipeft.apply(backbone, method, targets=targets)
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
