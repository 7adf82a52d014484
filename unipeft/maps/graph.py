"""Structure map for graph neural networks built from PyTorch Geometric layers.

Every graph convolution of the model is one layer (``layer=i``, in the order the model
holds them), whatever its class: message-passing layers (``GCNConv``, ``GATConv``,
``GINConv``, ``SAGEConv``...) and the dense ones (``DenseGCNConv``, ``DenseGATConv``...).
Roles:

``gnn.lin``
    The layer's node projection (``lin``; ``lin_src`` / ``lin_dst`` of a bipartite
    ``GATConv``; ``lin_l`` / ``lin_r`` of ``SAGEConv``...): PyG's ``Linear``, whose weight
    is ``(out, in)`` like ``nn.Linear``'s, so reparameterised deltas merge into it.
``gnn.mlp``
    The projections of the MLP inside a ``GINConv`` / ``GINEConv`` (its ``nn``).
``block``
    The layer's output (node features after aggregation), for adapters and scalings.
``head``
    A classifier the model holds as ``head`` / ``classifier`` / ``fc`` / ``out`` outside the
    graph layers.

PyTorch Geometric imports nothing here: layers are told by their class and module. A lazy
layer (``in_channels=-1``) has no weight shape until its first forward pass; the map
refuses it, naming the layer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.maps import is_pyg_linear, output_features, projection_site, weight_ref
from ..contract.sites import ModuleSite, Site
from .tiny import TinyBackbone

_HEADS = ("head", "classifier", "fc", "out", "lin_out")


def _is_graph_layer(module: nn.Module) -> bool:
    cls = type(module)
    if not cls.__module__.startswith("torch_geometric.nn."):
        return False
    if any(c.__name__ == "MessagePassing" for c in cls.__mro__[1:]):
        return True
    return cls.__name__.startswith("Dense") and cls.__name__.endswith("Conv")


def graph_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The outermost PyG graph layers of ``model``, in the order it holds them."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if _is_graph_layer(module):
            inside.append(path)
            yield path, module


def _uninitialised(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, nn.parameter.UninitializedParameter)


def _width(layer: nn.Module) -> int:
    """The width of a layer's node features out: ``heads * out_channels`` for a
    concatenating attention layer, else ``out_channels``, else its last projection's."""
    out = getattr(layer, "out_channels", None)
    if isinstance(out, int) and out > 0:
        heads = getattr(layer, "heads", 1)
        return out * heads if getattr(layer, "concat", False) else out
    last = 0
    for m in layer.modules():
        ref = weight_ref(m)
        if ref is not None:
            last = ref.out_features
    return last or output_features(layer)


class GraphMap:
    """Models holding PyTorch Geometric graph layers; see the module docstring."""

    name = "torch-geometric"
    priority = 0
    description = "PyTorch Geometric graph networks (GCN, GAT, GIN, SAGE... and dense layers)"
    default_targets = MappingProxyType(
        {
            "projection": ("gnn.lin", "gnn.mlp?"),
            "ssf": ("gnn.lin", "gnn.mlp?"),
            # the biases of projections (a graph layer's own bias, added after aggregation,
            # has no projection to fold into)
            "bitfit": ("gnn.lin?", "gnn.mlp?", "head?"),
            # parallel adapters read the site's input: a graph layer that changes the width
            # (the first, usually) cannot take one; target such layers by hand
            "adaptformer": None,
            "mam_adapter": None,
            "ln_tuning": None,  # no norms of their own in graph layers
            # X-LoRA's classifier reads one width: the GIN MLP's input and hidden width
            "xlora": ("gnn.mlp",),
            "module": ("block",),
        }
    )

    def matches(self, model: nn.Module) -> bool:
        return next(graph_layers(model), None) is not None

    def sites(self, model: nn.Module) -> list[Site]:
        out: list[Site] = []
        claimed: set[int] = set()
        for i, (path, layer) in enumerate(graph_layers(model)):
            claimed.update(id(m) for m in layer.modules())
            out.extend(_layer_sites(path, layer, i))
        for path, module in model.named_modules():
            if path.rpartition(".")[2] in _HEADS and id(module) not in claimed:
                site = projection_site(
                    name=path, path=path, module=module, role="head", layer=None, tower=None
                )
                if site is not None:
                    out.append(site)
        return out


def _layer_sites(path: str, layer: nn.Module, i: int) -> list[Site]:
    out: list[Site] = []
    mlp = getattr(layer, "nn", None)
    mlp = mlp if isinstance(mlp, nn.Module) else None
    for rel, child in layer.named_children():
        if child is mlp or not (isinstance(child, nn.Linear) or is_pyg_linear(child)):
            continue
        out.append(_projection(_join(path, rel), child, "gnn.lin", i, layer))
    if mlp is not None:
        for rel, child in mlp.named_modules():
            if isinstance(child, nn.Linear) or is_pyg_linear(child):
                out.append(_projection(_join(path, _join("nn", rel)), child, "gnn.mlp", i, layer))
    out.append(
        ModuleSite(
            name=f"{path}:block",
            role="block",
            layer=i,
            tower=None,
            path=path,
            module=layer,
            features=_width(layer),
        )
    )
    return out


def _join(path: str, rel: str) -> str:
    return f"{path}.{rel}" if path else rel


def _projection(path: str, module: nn.Module, role: str, i: int, layer: nn.Module) -> Site:
    if _uninitialised(module):
        raise ValueError(
            f"the graph layer {type(layer).__name__} at layer {i} has a lazily initialised "
            f"projection {path!r} (in_channels=-1), whose weight has no shape yet: run one "
            "forward pass on real inputs before unipeft.apply, or give in_channels"
        )
    site = projection_site(name=path, path=path, module=module, role=role, layer=i, tower=None)
    assert site is not None  # a Linear with a materialised 2-D weight is a projection
    return site


GRAPH_MAP = GraphMap()


_RING = ((0, 1, 1, 2, 2, 3, 3, 4, 4, 0), (1, 0, 2, 1, 3, 2, 4, 3, 0, 4))
"""The tiny network's graph: a ring of five nodes, both directions."""


class TinyGNN(nn.Module):
    """GCN, then GAT (dense, so that the batch stays first), then GIN, then a mean over the
    nodes and a linear classifier. Takes node features ``x`` ``(B, N, 8)`` of ``B`` graphs
    sharing one ``edge_index`` (PyG's static-graph mode; by default the ring the model
    holds); returns the node features ``(B, N, 16)`` and the graph logits ``(B, 3)``.

    The graph is held by the model rather than passed with each batch: ``Parallel``
    replicates every tensor argument whose first dimension is the batch's, and an
    ``edge_index`` ``(2, E)`` passed with a batch of two graphs looks like one."""

    def __init__(self) -> None:
        super().__init__()
        from torch_geometric.nn import DenseGATConv, GCNConv, GINConv

        self.convs = nn.ModuleList(
            [
                GCNConv(8, 16),
                DenseGATConv(16, 16, heads=1),
                GINConv(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))),
            ]
        )
        self.head = nn.Linear(16, 3)
        self.register_buffer("edge_index", torch.tensor(_RING), persistent=False)

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        from torch_geometric.utils import to_dense_adj

        edges = self.edge_index if edge_index is None else edge_index
        adj = to_dense_adj(edges, max_num_nodes=x.shape[1]).to(x.dtype)
        h = torch.relu(self.convs[0](x, edges))
        h = torch.relu(self.convs[1](h, adj))
        h = self.convs[2](h, edges)
        return h, self.head(h.mean(dim=1))


def _graph_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {"x": torch.randn(2, 5, 8, generator=gen)}


def _gnn_run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    nodes, logits = model(inputs["x"])
    return [nodes, logits]


GNN_TINY = TinyBackbone("gnn", "graph", TinyGNN, _graph_inputs, _gnn_run)

GRAPH_MAPS = (GRAPH_MAP,)
GRAPH_TINY: tuple[TinyBackbone, ...] = (
    (GNN_TINY,) if importlib.util.find_spec("torch_geometric") is not None else ()
)
"""The tiny graph network, registered only where PyTorch Geometric is installed."""
