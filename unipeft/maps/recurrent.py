"""Recurrent networks: a structure map for ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``, and two
tiny recurrent backbones for the conformance kit.

A recurrent layer keeps, for each layer ``l`` and direction, an input weight
``weight_ih_l{l}`` ``(gates·H, in)`` and a recurrent weight ``weight_hh_l{l}``
``(gates·H, H)`` (``_reverse`` for the backward direction of a bidirectional layer), with
their biases, and multiplies them inside one fused kernel, step after step. Each of those
weights is a site of its own (roles ``rnn.ih`` and ``rnn.hh``, ``layer`` = ``l``), named
like the parameter it adapts (``lstm.weight_hh_l1_reverse``). The recurrent host
(:mod:`unipeft.runtime.rnn_host`) runs the deltas there as the effective weights they
produce, so only methods with a merged-weight form apply (the sites say so through
:attr:`~unipeft.ModuleSite.merged_form_only`); merging writes into the layer's own packed
parameters. An LSTM with ``proj_size`` keeps its projection ``weight_hr_l{l}`` untouched
(its recurrent sites take the projected width as input). Token embeddings (``nn.Embedding``)
are sites of role ``embed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..contract.maps import output_features
from ..contract.sites import ModuleSite, Site, WeightRef
from .tiny import TinyBackbone

_KINDS = (nn.LSTM, nn.GRU, nn.RNN)

_APPLIES = ("rnn.ih", "rnn.hh")
_REFUSED = ("rnn.ih?", "rnn.hh?")


def recurrent_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` running PyTorch's own
    forward (a subclass with a forward of its own may not read the packed weights)."""
    return isinstance(module, _KINDS) and type(module).forward in {k.forward for k in _KINDS}


def recurrent_sites(path: str, rnn: nn.RNNBase) -> list[ModuleSite]:
    """The ``rnn.ih`` and ``rnn.hh`` sites of one recurrent layer at ``path``."""
    kind = f"a recurrent weight of nn.{type(rnn).__name__} (packed, read inside its fused kernel)"
    directions = ("", "_reverse") if rnn.bidirectional else ("",)
    out: list[ModuleSite] = []
    for layer in range(rnn.num_layers):
        for suffix in directions:
            for part in ("ih", "hh"):
                wname = f"weight_{part}_l{layer}{suffix}"
                w = getattr(rnn, wname)
                out.append(
                    ModuleSite(
                        name=f"{path}.{wname}" if path else wname,
                        role=f"rnn.{part}",
                        layer=layer,
                        tower=None,
                        path=path,
                        module=rnn,
                        features=int(w.shape[0]),
                        weight=WeightRef(
                            "linear",
                            wname,
                            f"bias_{part}_l{layer}{suffix}",
                            int(w.shape[1]),
                            int(w.shape[0]),
                        ),
                        host_path=path,
                        host=rnn,
                        merged_form_only=kind,
                    )
                )
    return out


class RecurrentMap:
    """Any model holding an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (see the module docstring).

    Its priority sits above the generic map and below every transformer map, so a
    transformer with a recurrent part somewhere is still read as a transformer."""

    name = "recurrent"
    priority = -100
    description = "nn.LSTM / nn.GRU / nn.RNN: input and recurrent weights per layer and direction"
    default_targets: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {
            # every reparameterized method has a merged-weight form: it must attach
            "reparameterized": _APPLIES,
            "shira": _APPLIES,
            # the rest attach where their method has a merged form (IA3, SSF, BitFit) and are
            # refused, naming the site kind, where it has none
            "additive": _REFUSED,
            "selective": _REFUSED,
            "hybrid": _REFUSED,
            "moe": _REFUSED,
            "projection": _REFUSED,
            "module": _REFUSED,
            "sequence": _REFUSED,
        }
    )

    def matches(self, model: nn.Module) -> bool:
        return any(recurrent_layer(m) for m in model.modules())

    def sites(self, model: nn.Module) -> list[Site]:
        out: list[Site] = []
        for path, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                out.append(
                    ModuleSite(
                        name=path or type(module).__name__,
                        role="embed",
                        layer=None,
                        tower=None,
                        path=path,
                        module=module,
                        features=output_features(module),
                    )
                )
            elif recurrent_layer(module):
                assert isinstance(module, nn.RNNBase)
                out.extend(recurrent_sites(path, module))
        return out


RECURRENT_MAPS = (RecurrentMap(),)


# --------------------------------------------------------------------------- tiny backbones

_VOCAB, _WIDTH, _CLASSES = 100, 16, 3


class RecurrentClassifier(nn.Module):
    """Token ids ``(N, L)`` → embedding → recurrent layers → mean over time → classifier.

    ``forward`` returns ``(logits (N, classes), sequence output (N, L, D·H))`` whatever the
    layer's ``batch_first``."""

    def __init__(self, rnn: nn.RNNBase, vocab: int = _VOCAB, classes: int = _CLASSES) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, rnn.input_size)
        self.rnn = rnn
        width = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed_tokens(input_ids)
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        seq, _ = self.rnn(x)
        if not self.rnn.batch_first:
            seq = seq.transpose(0, 1)
        return self.head(seq.mean(dim=1)), seq


def _lstm() -> nn.Module:
    rnn = nn.LSTM(_WIDTH, _WIDTH, num_layers=2, bidirectional=True, batch_first=True)
    return RecurrentClassifier(rnn)


def _gru() -> nn.Module:
    return RecurrentClassifier(nn.GRU(_WIDTH, _WIDTH, num_layers=2, batch_first=False))


def _inputs(gen: torch.Generator) -> dict[str, Any]:
    return {"input_ids": torch.randint(0, _VOCAB, (2, 6), generator=gen)}


def _run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    logits, seq = model(inputs["input_ids"])
    return [logits, seq]


RECURRENT_TINY = (
    TinyBackbone("lstm", "recurrent", _lstm, _inputs, _run),
    TinyBackbone("gru", "recurrent", _gru, _inputs, _run),
)
"""``lstm``: a 2-layer bidirectional ``nn.LSTM`` (batch first) of width 16 over a 100-token
embedding; ``gru``: the same with a unidirectional ``nn.GRU`` in ``(L, N, H)`` layout."""
