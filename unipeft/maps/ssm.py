"""Structure map for state-space models: transformers' Mamba (``MambaModel``,
``MambaForCausalLM``, and FalconMamba, which keeps the same mixer layout) and Mamba2.

A Mamba block is a norm and a mixer. The mixer projects the hidden states up to twice the
inner width (``in_proj``: the SSM input and its gate), runs a depthwise causal convolution
over time (``conv1d``), projects the SSM input down to the time step's rank and the state
matrices B and C (``x_proj``), lifts the time step back to the inner width (``dt_proj``),
runs the selective scan and projects back to the hidden width (``out_proj``).

Roles: ``ssm.in`` / ``ssm.x`` / ``ssm.out`` (the projections the mixer calls as modules),
``mixer`` (the whole mixer, input to output, before the residual sum), ``norm``, ``block``,
``embed`` and the token sequence ``tokens``. ``ssm.dt`` and ``ssm.conv`` are sites only
where the mixer calls ``dt_proj`` / ``conv1d`` as modules (transformers 4's slow path):
transformers 5's mixer reads their weights in its own arithmetic, so a delta attached there
would never run. :func:`mixer_calls` finds out by running one mixer once.

On CUDA with the ``mamba_ssm`` kernels installed, a mixer in training mode runs one fused
kernel that reads ``x_proj``, ``dt_proj``, ``out_proj`` and ``conv1d`` weights directly;
the map then exposes only ``ssm.in`` among the projections (:func:`fused_kernels`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.maps import BlockLayout, LayoutMap, Tower, output_features, projection_site
from ..contract.sites import ModuleSite, SequenceSite, Site
from .tiny import TinyBackbone

_CALLED_AS_MODULES = ("in_proj", "x_proj", "out_proj")
_READ_DIRECTLY = {"dt_proj": "ssm.dt", "conv1d": "ssm.conv"}


_PROBED: dict[tuple[type, bool], frozenset[str]] = {}


def mixer_calls(mixer: nn.Module) -> frozenset[str]:
    """The submodules among ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` and
    ``conv1d`` that ``mixer``'s forward calls as modules (only there can a delta's hook
    run), seen by running it once in eval mode, without gradients, on two zero tokens.
    Remembered per mixer class (and whether its model is quantized, which transformers'
    mixers branch on); a mixer that cannot run so is taken to call the three projections."""
    quantized = hasattr(getattr(mixer, "config", None), "_is_quantized")
    key = (type(mixer), quantized)
    if key not in _PROBED:
        _PROBED[key] = _probe(mixer)
    return _PROBED[key]


def _probe(mixer: nn.Module) -> frozenset[str]:
    names = [n for n in (*_CALLED_AS_MODULES, *_READ_DIRECTLY) if hasattr(mixer, n)]
    called: set[str] = set()
    handles = [
        getattr(mixer, n).register_forward_pre_hook(lambda m, a, n=n: called.add(n)) for n in names
    ]
    floats = [p for p in mixer.parameters() if p.is_floating_point()]
    width = getattr(mixer.in_proj, "in_features", None)
    modes = [(m, m.training) for m in mixer.modules()]
    try:
        if not floats or not isinstance(width, int):
            raise TypeError("no floating weights or no input width to probe with")
        mixer.eval()
        with torch.no_grad():
            mixer(torch.zeros(1, 2, width, dtype=floats[0].dtype, device=floats[0].device))
    except Exception:
        return frozenset(_CALLED_AS_MODULES)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return frozenset(called)


def fused_kernels() -> bool:
    """Whether the ``mamba_ssm`` CUDA kernels are importable: then transformers' Mamba
    mixer, in training mode, runs the fused kernel that reads every projection's weight but
    ``in_proj``'s directly, and hooks on the others never run."""
    return importlib.util.find_spec("mamba_ssm") is not None


def _sequence(model: nn.Module, prefix: str, tower: str | None) -> SequenceSite | None:
    base = model.get_submodule(prefix.rstrip(".")) if prefix else model
    get_embeddings = getattr(base, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if embedding is None:
        return None
    return SequenceSite(
        name=f"{prefix}tokens",
        tower=tower,
        features=int(base.config.hidden_size),
        insert=base,
        strip=base,
        index=0,
        style="hf_text",
        embedding=embedding,
        attends=False,  # a state-space stack: soft tokens go in front, prefixes have nowhere
    )


_TOWER = Tower(r"(?P<prefix>.*\.)?layers", embed="embeddings", sequence=_sequence)
_LAYOUTS = (
    LayoutMap(
        name="transformers-mamba-layout",
        towers=(_TOWER,),
        layout=BlockLayout(
            projections={
                "ssm.in": "mixer.in_proj",
                "ssm.x": "mixer.x_proj",
                "ssm.out": "mixer.out_proj",
            },
            sublayers={"mixer": ("mixer", "mixer")},
            norms=("norm",),
        ),
    ),
    # Mamba2: one in_proj yields the SSM input, B, C, the time step and the gate; a gated
    # norm before out_proj; no x_proj or dt_proj
    LayoutMap(
        name="transformers-mamba2-layout",
        towers=(_TOWER,),
        layout=BlockLayout(
            projections={"ssm.in": "mixer.in_proj", "ssm.out": "mixer.out_proj"},
            sublayers={"mixer": ("mixer", "mixer")},
            norms=("norm", "mixer.norm"),
        ),
    ),
)


def _layout(model: nn.Module) -> LayoutMap | None:
    return next((layout for layout in _LAYOUTS if layout.matches(model)), None)


class MambaMap:
    """transformers' Mamba and FalconMamba: the blocks under ``layers`` (an ``embeddings``
    table before them), each ``norm`` + ``mixer`` with ``in_proj`` / ``conv1d`` /
    ``x_proj`` / ``dt_proj`` / ``out_proj``; and Mamba2, whose mixer has ``in_proj`` /
    ``conv1d`` / a gated ``norm`` / ``out_proj``. See the module docstring for the roles."""

    name = "transformers-mamba"
    priority = 0
    description = "Hugging Face Mamba / FalconMamba / Mamba2 (selective state-space mixers)"
    default_targets = MappingProxyType(
        {
            # the two wide projections hold most of a mixer's weights; low-rank updates of
            # them are the projection placement MambaPEFT (Yoshimura et al., 2024) studies.
            # Optional: out_proj is no site where the fused CUDA kernel reads it (see above)
            "projection": ("ssm.in", "ssm.out?"),
            # per-channel scales and shifts on what the projections and norms put out
            "ssf": ("ssm.in", "ssm.x?", "ssm.out?"),
            "ia3": ("ssm.x?", "ssm.out?"),
            "bitfit": ("ssm.in?", "ssm.x?", "ssm.out?", "norm?", "ssm.dt?", "ssm.conv?"),
            "ln_tuning": ("norm?",),  # Mamba2's gated mixer.norm is refused, the rest kept
            "trainable_tokens": ("embed",),  # the token table is named embeddings here
            # X-LoRA's classifier reads the hidden state: only in_proj takes it as input
            "xlora": ("ssm.in",),
            "module": ("mixer",),
        }
    )

    def matches(self, model: nn.Module) -> bool:
        return _layout(model) is not None

    def sites(self, model: nn.Module) -> list[Site]:
        layout = _layout(model)
        if layout is None:
            return []
        fused = fused_kernels()
        out: list[Site] = []
        for site in layout.sites(model):
            if fused and site.role in ("ssm.x", "ssm.out"):
                continue  # the fused kernel reads them: added below as weights it reads
            if site.role == "block" and isinstance(site, ModuleSite) and not site.features:
                site = replace(site, features=_hidden(site.module))
            out.append(site)
            if site.role == "mixer" and isinstance(site, ModuleSite):
                out.extend(_inner_sites(site, fused))
        return out


def _hidden(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    size = getattr(config, "hidden_size", None)
    return int(size) if size else output_features(module)


def _inner_sites(mixer_site: ModuleSite, fused: bool) -> list[Site]:
    """``ssm.dt`` / ``ssm.conv`` sites (and ``ssm.x`` / ``ssm.out`` under the fused kernel):
    a plain site where the mixer calls the module, else one the mixer's effective-weight
    host runs (merged-form methods only)."""
    out: list[Site] = []
    mixer = mixer_site.module
    called = mixer_calls(mixer)
    block_path = mixer_site.name.rpartition(":")[0]
    inner = dict(_READ_DIRECTLY)
    if fused:
        inner = {"x_proj": "ssm.x", **inner, "out_proj": "ssm.out"}
    for rel, role in inner.items():
        if not hasattr(mixer, rel):
            continue
        module = mixer.get_submodule(rel)
        path = f"{mixer_site.path}.{rel}"
        name = f"{block_path}:{role}"
        site = projection_site(
            name=name, path=path, module=module, role=role, layer=mixer_site.layer, tower=None
        )
        if site is None:  # the depthwise convolution: channels at dim 1 of (N, C, L)
            site = ModuleSite(
                name=name,
                role=role,
                layer=mixer_site.layer,
                tower=None,
                path=path,
                module=module,
                features=int(getattr(module, "out_channels", 0)) or output_features(module),
                channel_dim=1,
            )
        if fused or rel not in called:  # a Linear and a depthwise Conv1d: both probed
            site = replace(
                site,
                host=mixer,
                host_path=mixer_site.path,
                merged_form_only=(
                    f"a weight the {type(mixer).__name__} reads in its own arithmetic ({rel})"
                ),
            )
        out.append(site)
    return out


MAMBA_MAP = MambaMap()


_TINY = dict(
    hidden_size=16,
    state_size=4,
    num_hidden_layers=2,
    vocab_size=100,  # the token ids trainable_tokens draws stay below it
    expand=2,
    conv_kernel=3,
    use_cache=False,
    residual_in_fp32=False,  # outputs in the dtype of the weights
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def _tiny_mamba() -> nn.Module:
    from transformers import MambaConfig, MambaModel

    return MambaModel(MambaConfig(**_TINY, time_step_rank=4))


def _token_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {"input_ids": torch.randint(0, 100, (2, 6), generator=gen)}


def _mamba_run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    return [model(input_ids=inputs["input_ids"]).last_hidden_state]


MAMBA_TINY = TinyBackbone("mamba", "ssm", _tiny_mamba, _token_inputs, _mamba_run)
"""A two-block Mamba of width 16 (inner width 32, state size 4) on six-token sequences."""


def _tiny_mamba2() -> nn.Module:
    from transformers import Mamba2Config, Mamba2Model

    # four heads of 8 over the inner width 32; chunks of 4 tokens, so that the six-token
    # inputs span two chunks of the chunked scan
    return Mamba2Model(Mamba2Config(**_TINY, head_dim=8, num_heads=4, n_groups=1, chunk_size=4))


MAMBA2_TINY = TinyBackbone("mamba2", "ssm", _tiny_mamba2, _token_inputs, _mamba_run)
"""A two-block Mamba2 of width 16 (inner width 32, 4 heads of 8, state size 4, chunks of 4
tokens) on six-token sequences."""

SSM_MAPS = (MAMBA_MAP,)
SSM_TINY = (MAMBA_TINY, MAMBA2_TINY)
