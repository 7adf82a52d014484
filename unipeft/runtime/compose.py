"""How a composition (:mod:`unipeft.compose`) runs: checked against the model's adapters at
``set_active``, evaluated at module sites, fused by per-site :class:`FusionSite` layers, and
run in parallel over a replicated batch.

Stack-only compositions need nothing here: the hosts already run the active adapters in
order. Compositions with :class:`~unipeft.compose.Average` or :class:`~unipeft.compose.Fuse`
are evaluated by :func:`run_composed` at every module site (the module host calls it for a
group of attachments on one output); :class:`~unipeft.compose.Parallel` replicates the
batch and runs it as a mixed batch (one adapter per copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..compose import Average, Composition, Fuse, Parallel, Stack
from ..contract.deltas import DeltaModule
from ..contract.errors import AdapterError, MergeError
from ..contract.sites import ModuleSite
from .state import AdapterState, Attachment

__all__ = [
    "Fusion",
    "FusionSite",
    "build_fusion",
    "check_composition",
    "fuse_nodes",
    "fusion_loss",
    "fusion_sites",
    "merge_refusal",
    "needs_evaluation",
    "parallel_inputs",
    "positional",
    "replicate",
    "reuse_fusion",
    "run_composed",
]

_VERB = {"average": "average", "fuse": "fuse"}


# ----------------------------------------------------------------------------- fusion


class FusionSite(nn.Module):
    """AdapterFusion at one site: ``y + Σ_i α_i V o_i`` with ``α = softmax_i((Q y)·(K o_i)
    / T)``. ``Q`` and ``K`` are linear maps with bias (weights drawn from N(0, 0.02²),
    biases zero, as in the paper's code); ``V`` has no bias and starts as the identity."""

    def __init__(self, features: int, channel_dim: int = -1) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.query = nn.Linear(features, features)
        self.key = nn.Linear(features, features)
        self.value = nn.Linear(features, features, bias=False)
        with torch.no_grad():
            for lin in (self.query, self.key):
                lin.weight.normal_(0.0, 0.02)
                lin.bias.zero_()
            self.value.weight.copy_(torch.eye(features))

    def forward(self, y: Tensor, changes: Sequence[Tensor], temperature: float) -> Tensor:
        last = self.channel_dim in (-1, y.ndim - 1)
        yl = y if last else y.movedim(self.channel_dim, -1)
        o = torch.stack([c if last else c.movedim(self.channel_dim, -1) for c in changes], -2)
        dtype = self.query.weight.dtype
        q = self.query(yl.to(dtype))  # (..., D)
        k = self.key(o.to(dtype))  # (..., n, D)
        scores = (k @ q.unsqueeze(-1)).squeeze(-1) / temperature  # (..., n)
        alpha = torch.softmax(scores, dim=-1)
        fused = (alpha.unsqueeze(-1) * self.value(o.to(dtype))).sum(-2).to(y.dtype)
        return y + (fused if last else fused.movedim(-1, self.channel_dim))

    def regularization(self) -> Tensor:
        """``‖I − V‖²`` (Frobenius): the paper's pull of the value matrix to the identity."""
        w = self.value.weight
        return (torch.eye(w.shape[0], device=w.device, dtype=w.dtype) - w).pow(2).sum()


class Fusion(nn.ModuleDict):
    """The fusion layers of one :class:`~unipeft.compose.Fuse`, one per site (keys: the site
    name with ``.`` as ``__``). ``spec`` is the Fuse, ``site_names`` the real site names."""

    def __init__(self, spec: Fuse, layers: Mapping[str, FusionSite]) -> None:
        super().__init__({k.replace(".", "__"): v for k, v in layers.items()})
        self.spec = spec
        self.site_names = {k.replace(".", "__"): k for k in layers}

    def at(self, site_name: str) -> FusionSite | None:
        key = site_name.replace(".", "__")
        return self[key] if key in self else None  # type: ignore[return-value]

    def regularization(self) -> Tensor | None:
        terms = [m.regularization() for m in self.values()]  # type: ignore[attr-defined]
        return torch.stack([t.float() for t in terms]).sum() if terms else None


def fusion_sites(spec: Fuse, adapters: Mapping[str, Any]) -> dict[str, ModuleSite]:
    """The sites a fusion has a layer at: one per distinct output (module and slice) that
    any of its adapters adapts, named after the first such site in the order of the Fuse's
    adapters (the order :func:`run_composed` looks them up in)."""
    out: dict[tuple[int, Any, Any], ModuleSite] = {}
    for leaf in spec.leaves():
        for site in adapters[leaf].sites:
            if isinstance(site, ModuleSite):
                # a module may hold several weights that are sites (nn.LSTM's packed ones)
                weight = site.weight.weight_name if site.weight is not None else "weight"
                weight = None if weight == "weight" else weight
                out.setdefault((id(site.module), weight, site.out_slice), site)
    return {s.name: s for s in out.values()}


def build_fusion(
    spec: Fuse,
    adapters: Mapping[str, Any],
    state: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> Fusion:
    """A new :class:`Fusion` for ``spec``: a layer per site, on the site's device and dtype,
    loaded from ``state`` (site name -> tensors) if given; a mismatch raises AdapterError."""
    sites = fusion_sites(spec, adapters)
    if state is not None and set(state) != set(sites):
        raise AdapterError(
            f"the fusion {spec.name!r} was saved with layers at sites {sorted(state)}, but its "
            f"adapters adapt {sorted(sites)} here"
        )
    layers = {}
    rng = torch.random.fork_rng(devices=[]) if state is not None else contextlib.nullcontext()
    with rng:  # loaded layers leave the global generator as it was
        for name, site in sites.items():
            ref = site.reference_tensor()
            layer = FusionSite(site.features, site.channel_dim)
            layers[name] = layer.to(device=ref.device, dtype=ref.dtype)
            if state is not None:
                _load_layer(layers[name], state[name], spec.name, name)
    return Fusion(spec, layers)


def _load_layer(layer: FusionSite, tensors: Mapping[str, Tensor], fusion: str, site: str) -> None:
    current = layer.state_dict()
    if set(tensors) != set(current):
        raise AdapterError(
            f"the fusion {fusion!r} at site {site!r} was saved with {sorted(tensors)}, but a "
            f"fusion layer holds {sorted(current)}"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise AdapterError(
                f"the fusion {fusion!r} at site {site!r}: {key} has shape {tuple(value.shape)}, "
                f"but this backbone needs {tuple(current[key].shape)}"
            )
    with torch.no_grad():
        layer.load_state_dict(
            {k: v.to(dtype=current[k].dtype, device=current[k].device) for k, v in tensors.items()}
        )


def reuse_fusion(fusions: Mapping[str, Any], spec: Fuse) -> bool:
    """Whether layers for ``spec`` exist already (their spec then becomes ``spec``, for its
    settings); an AdapterError if its name is taken by a fusion of other adapters."""
    have = fusions[spec.name] if spec.name in fusions else None
    if have is None:
        return False
    if have.spec.leaves() != spec.leaves():
        raise AdapterError(
            f"a fusion named {spec.name!r} already fuses {list(have.spec.leaves())}; give "
            "this Fuse another name=..."
        )
    have.spec = spec
    return True


def fuse_nodes(node: Composition | None) -> list[Fuse]:
    """Every Fuse in the tree, depth first."""
    return [] if node is None else [n for n, _ in _walk(node) if isinstance(n, Fuse)]


def fusion_loss(node: Composition | None, fusions: Mapping[str, Any]) -> Tensor | None:
    """``Σ_fuse regularization · Σ_sites ‖I − V‖²`` over the Fuse nodes of the tree."""
    total = None
    for fuse in fuse_nodes(node):
        if fuse.regularization and fuse.name in fusions:
            reg = fusions[fuse.name].regularization()
            if reg is not None:
                term = fuse.regularization * reg
                total = term if total is None else total + term
    return total


# ----------------------------------------------------------------------------- checks


def _walk(node: Composition, depth: int = 0) -> list[tuple[Composition, int]]:
    out = [(node, depth)]
    for child in node.children:
        if isinstance(child, Composition):
            out.extend(_walk(child, depth + 1))
    return out


def needs_evaluation(node: Composition | None) -> bool:
    """Whether module hosts evaluate the tree (it holds an Average or a Fuse): Stack-only
    trees and Parallel run on the hosts' usual paths."""
    if node is None:
        return False
    return any(isinstance(n, Average | Fuse) for n, _ in _walk(node))


def check_composition(
    node: Composition, adapters: Mapping[str, Any], merged: Sequence[str]
) -> None:
    """Refuse what has no meaning, naming the operator, the adapter and its method, and
    what works instead. ``adapters`` maps every leaf to its ``Adapter``."""
    for sub, depth in _walk(node):
        op = type(sub).__name__
        if isinstance(sub, Parallel):
            if depth:
                raise AdapterError(
                    f"{sub!r} is nested inside another operator; Parallel replicates the whole "
                    "batch, so it is accepted only as the composition itself "
                    "(set_active(Parallel(...)))"
                )
            if merged:
                raise MergeError(
                    f"Parallel runs each copy of the batch through one adapter, but adapters "
                    f"{list(merged)} are merged into the shared weights; unmerge() them first"
                )
            continue
        if not isinstance(sub, Average | Fuse):
            continue
        for leaf in sub.leaves():
            adapter = adapters[leaf]
            method = adapter.method.id
            if leaf in merged:
                raise MergeError(
                    f"{op} cannot combine adapter {leaf!r} (method {method!r}): it is merged "
                    f"into the backbone's weights, so its output cannot be weighed apart from "
                    "the base; unmerge() it first, or use Stack(...)"
                )
            why = positional(adapter)
            if why is not None:
                raise AdapterError(
                    f"{op} cannot combine adapter {leaf!r}: method {method!r} {why}, which add "
                    f"positions instead of changing an output, so there is nothing to "
                    f"{_VERB[sub.op]}; use Stack(...) (concatenates them) or Parallel(...) "
                    "(one copy of the batch per adapter)"
                )
            if isinstance(sub, Fuse):
                blind = next((s for s in adapter.sites if s.features <= 0), None)
                if blind is not None:
                    raise AdapterError(
                        f"Fuse cannot combine adapter {leaf!r} (method {method!r}): the width "
                        f"of site {blind.name!r}'s output is unknown before it runs, so no "
                        "fusion layer can be sized for it; use Average(...) or Stack(...), or "
                        "target projections or blocks"
                    )


def merge_refusal(node: Composition | None) -> str | None:
    """Why ``merge()`` is refused while ``node`` is active: a merged adapter runs at full
    strength in the shared weights, which Average, Fuse and Parallel cannot weigh or split."""
    ops = sorted(
        {type(n).__name__ for n, _ in _walk(node) if not isinstance(n, Stack)} if node else set()
    )
    if not ops:
        return None
    return (
        f"merge() is refused while {node!r} is active: {' and '.join(ops)} cannot weigh or "
        "split a change folded into the shared weights; set_active() a name, a list or a "
        "Stack first"
    )


def positional(adapter: Any) -> str | None:
    """How ``adapter`` adds positions instead of changing outputs (soft tokens at a sequence
    site, or keys and values prefixed to an attention), in words; None if it does not."""
    base = getattr(DeltaModule, "prefix", None)
    for att in adapter.attachments:
        if not isinstance(att.site, ModuleSite):
            return f"inserts soft tokens at {att.site.name!r} (a sequence site)"
        own = getattr(type(att.delta), "prefix", None)
        if own is not None and own is not base:
            return f"prefixes keys and values to the attention at {att.site.name!r}"
    return None


# ----------------------------------------------------------------------------- evaluation


def run_composed(
    node: Composition,
    atts: Sequence[Attachment],
    x: Tensor | None,
    y: Tensor,
    input_for: Callable[[Attachment, Tensor | None], Tensor | None],
    fusions: Mapping[str, Fusion],
) -> Tensor:
    """The output of ``node`` at one output ``y`` (one site or slice), given the running
    attachments there. Adapters of the tree without an attachment here are the identity."""
    by: dict[str, list[Attachment]] = {}
    for att in atts:
        by.setdefault(att.adapter, []).append(att)
    return _eval(node, by, x, y, input_for, fusions)


def _present(node: str | Composition, by: Mapping[str, list[Attachment]]) -> bool:
    leaves = node.leaves() if isinstance(node, Composition) else (node,)
    return any(leaf in by for leaf in leaves)


def _eval(
    node: str | Composition,
    by: Mapping[str, list[Attachment]],
    x: Tensor | None,
    y: Tensor,
    input_for: Callable[[Attachment, Tensor | None], Tensor | None],
    fusions: Mapping[str, Fusion],
) -> Tensor:
    if isinstance(node, str):
        for att in by.get(node, ()):
            y = att.delta(input_for(att, x), y)
        return y
    if isinstance(node, Stack | Parallel):
        for child in node.children:
            y = _eval(child, by, x, y, input_for, fusions)
        return y
    if isinstance(node, Average):
        out = y
        for w, child in zip(node.effective_weights(), node.children, strict=True):
            if _present(child, by):
                out = out + w * (_eval(child, by, x, y, input_for, fusions) - y)
        return out
    assert isinstance(node, Fuse)
    present = [c for c in node.children if _present(c, by)]
    if not present:
        return y
    site = next(a.site for leaf in node.leaves() for a in by.get(leaf, ()))
    fusion = fusions.get(node.name)
    layer = None if fusion is None else fusion.at(site.name)
    if layer is None:
        raise RuntimeError(
            f"the fusion {node.name!r} has no layer at site {site.name!r}; set_active() the "
            "Fuse again after adding adapters or sites"
        )
    changes = [_eval(c, by, x, y, input_for, fusions) - y for c in present]
    return layer(y, changes, node.temperature)


# ----------------------------------------------------------------------------- parallel


def replicate(args: tuple, kwargs: dict, copies: int) -> tuple[tuple, dict, int | None]:
    """Every tensor argument whose first dimension is the batch's (the first tensor's),
    repeated ``copies`` times along it: copy ``i`` is samples ``i·N`` to ``(i+1)·N − 1``.
    ``N`` is None (nothing replicated) when no argument is a tensor with a dimension."""
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim()), None)
    if first is None:
        return args, kwargs, None
    n = first.shape[0]

    def rep(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == n:
            return torch.cat([value] * copies, dim=0)
        return value

    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}, n


def parallel_inputs(
    state: AdapterState, args: tuple, kwargs: dict, whole: bool
) -> tuple[tuple, dict, tuple[str, ...] | None]:
    """The arguments of a call while Parallel is active, and the adapter of each sample.

    ``model(...)`` (``whole``) always replicates its batch. A method looked up on the model
    (``encode_image``, timm's ``forward_features`` and ``forward_head``) replicates too,
    except when its batch is already ``k·N`` for the ``N`` the previous Parallel call
    replicated: then it is taken as that call's replicated output (timm's
    ``forward_head(forward_features(x))``) and routed as is. ``None``: run unrouted."""
    names = state.parallel
    if names is None or not state.enabled or state.routing is not None:
        return args, kwargs, None
    k = len(names)
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim()), None)
    if first is None:
        return args, kwargs, None
    if not whole and state.parallel_batch and first.shape[0] == k * state.parallel_batch:
        n = state.parallel_batch
    else:
        args, kwargs, n = replicate(args, kwargs, k)
        state.parallel_batch = n
    assert n is not None
    return args, kwargs, tuple(a for a in names for _ in range(n))
