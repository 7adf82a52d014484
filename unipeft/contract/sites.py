"""Sites: the places in a backbone where a delta module can attach.

A structure map turns a backbone into a list of sites. There are two kinds:

``ModuleSite``
    A module whose output ``y`` a delta may transform, given the module's input ``x``
    (``y' = delta(x, y)``). ``entry`` may name a different module whose *input* is ``x``
    (a parallel path around a sublayer, e.g. BERT's FFN runs from ``intermediate`` to
    ``output.dense``). ``out_slice`` restricts the delta to a slice of the output channels,
    which is how fused projections (timm's ``qkv`` Linear, ``nn.MultiheadAttention``'s
    ``in_proj_weight``) expose ``attn.q`` / ``attn.k`` / ``attn.v`` separately.
    When the module is a projection (Linear, GPT-2 ``Conv1D``, Conv, MHA input projection),
    ``weight`` describes its weight so that reparameterised deltas can merge into it.

``SequenceSite``
    The token sequence of one transformer stack, where soft prompts are inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

Layout = Literal["linear", "conv1d_t", "conv", "mha_in"]
"""How a projection stores its weight.

``linear``: ``(out, in)`` as ``nn.Linear``; ``conv1d_t``: ``(in, out)`` as GPT-2's ``Conv1D``;
``conv``: ``(out, in, *kernel)`` as ``nn.ConvNd``; ``mha_in``: the fused ``in_proj_weight``
``(3E, E)`` of ``nn.MultiheadAttention``.
"""


class WeightCodec(Protocol):
    """How to read, and rewrite, a projection weight stored in a quantized format
    (bitsandbytes 4-bit and 8-bit, torchao tensor subclasses). :mod:`unipeft.quantization`
    registers the built-in ones with :func:`register_weight_codec`; the contract itself
    imports no quantization library."""

    name: str
    """The format in words, used in messages (``"bitsandbytes Linear4bit"``...)."""

    def claims(self, module: nn.Module | None, weight: Tensor) -> bool:
        """Whether ``weight`` (the ``weight`` of ``module``, when known) is in this format."""
        ...

    def dequantize(self, module: nn.Module, weight: Tensor) -> Tensor:
        """A full-precision copy ``(out, in)`` of the weight the layer computes with."""
        ...

    def compute_dtype(self, module: nn.Module, weight: Tensor) -> torch.dtype | None:
        """The floating dtype the layer computes in, or ``None`` when it follows its input."""
        ...

    def requantize_refusal(self, module: nn.Module, weight: Tensor) -> str | None:
        """Why :meth:`requantize` cannot rewrite this weight, or ``None``."""
        ...

    def snapshot(self, module: nn.Module, name: str) -> Any:
        """Everything :meth:`restore` needs to put the layer's quantized weight back exactly
        (the parameter object and any state the layer keeps beside it)."""
        ...

    def restore(self, module: nn.Module, name: str, snapshot: Any) -> None: ...

    def requantize(self, module: nn.Module, name: str, weight: Tensor) -> None:
        """Quantize the full-precision ``weight`` ``(out, in)`` in the layer's format (its
        block size, quantization type, storage) and install it as the layer's weight."""
        ...


_CODECS: list[WeightCodec] = []
_PLAIN = (Tensor, nn.Parameter)


def register_weight_codec(codec: WeightCodec) -> None:
    """Teach sites a quantized weight format (a codec of the same ``name`` is replaced)."""
    _CODECS[:] = [c for c in _CODECS if c.name != codec.name]
    _CODECS.append(codec)


def weight_codec(weight: Any, module: nn.Module | None = None) -> WeightCodec | None:
    """The registered codec of a quantized ``weight`` (of ``module``), or ``None`` for a
    plain weight (a floating tensor of an ``nn.Linear``: checked first, so this is cheap on
    the common path)."""
    if not isinstance(weight, Tensor):
        return None
    if type(weight) in _PLAIN and weight.is_floating_point():
        if module is None or type(module) is nn.Linear:
            return None  # a plain layer (a subclass may keep packed storage in a float tensor)
    for codec in _CODECS:
        if codec.claims(module, weight):
            return codec
    return None


@dataclass(frozen=True)
class WeightRef:
    """A projection's weight and bias, for the rows a site owns."""

    layout: Layout
    weight_name: str
    bias_name: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    conv_args: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, eq=False)
class ModuleSite:
    """See the module docstring. ``name`` is unique within a backbone."""

    name: str
    role: str | None
    layer: int | None
    tower: str | None
    path: str
    module: nn.Module = field(repr=False)
    features: int
    entry_path: str | None = None
    entry: nn.Module | None = field(default=None, repr=False)
    out_slice: tuple[int, int] | None = None
    channel_dim: int = -1
    weight: WeightRef | None = None
    host_path: str | None = None
    """An ``nn.MultiheadAttention`` whose forward must be routed through unipeft so that
    this site's module is called as a module (its ``out_proj``) or so that the fused input
    projection can be adapted per slice."""
    host: nn.Module | None = field(default=None, repr=False)
    merged_form_only: str | None = None
    """Set where the module reads the weight inside one fused kernel and no delta can act
    on the projection's output (an ``nn.LSTM``'s packed recurrent weights): deltas run there
    only as the weights they produce, so only methods with a merged-weight form apply. The
    text says what the site is, for refusals (``"a recurrent weight of nn.LSTM"``)."""

    kind = "module"

    @property
    def in_features(self) -> int | None:
        return self.weight.in_features if self.weight is not None else None

    @property
    def is_projection(self) -> bool:
        return self.weight is not None

    def parameter(self, which: Literal["weight", "bias"]) -> torch.Tensor | None:
        """The base tensor (whole, not sliced) behind the site's weight or bias."""
        if self.weight is None:
            if which == "bias":
                return getattr(self.module, "bias", None)
            return getattr(self.module, "weight", None)
        name = self.weight.weight_name if which == "weight" else self.weight.bias_name
        return getattr(self.module, name, None)

    def weight_views(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` of the site as views of the backbone's live tensors, restricted
        to the site's output slice: a projection's weight in canonical ``(out, in,
        *kernel)`` layout (GPT-2's ``(in, out)`` ``Conv1D`` weight transposed), or the
        module's own weight as stored (a norm's ``(features,)``). ``bias`` is ``None`` when
        the module has none. Views, not copies: writing into them writes into the backbone,
        which is how the merge ledger folds a delta in. Read them under ``torch.no_grad()``
        or detach them; they carry no gradient either way.

        On a quantized layer (a :class:`WeightCodec` claims its weight) the weight is a
        dequantized full-precision *copy*, in the dtype the layer computes in: methods
        read the weight the layer multiplies with, and writing into it changes nothing
        (the merge ledger re-quantizes instead)."""
        w = self.parameter("weight")
        if w is None:
            raise TypeError(f"site {self.name!r} has no weight")
        b = self.parameter("bias")
        s = self.out_slice
        codec = weight_codec(w, self.module)
        if codec is not None:
            full = codec.dequantize(self.module, w)
            bv = None if b is None else (b.data[s[0] : s[1]] if s else b.data)
            return (full[s[0] : s[1]] if s else full), bv
        if self.weight is not None and not w.is_floating_point():
            raise TypeError(
                f"site {self.name!r}: the weight of {type(self.module).__name__} is a {w.dtype} "
                "tensor in a format unipeft cannot read; import unipeft.quantization "
                "(bitsandbytes, torchao), or register a WeightCodec for it"
            )
        if self.weight is not None and self.weight.layout == "conv1d_t":
            wv = w.data[:, s[0] : s[1]].t() if s else w.data.t()
        else:
            wv = w.data[s[0] : s[1]] if s else w.data
        bv = None if b is None else (b.data[s[0] : s[1]] if s else b.data)
        return wv, bv

    def merge_refusal(self) -> str | None:
        """Why no delta can be folded into this site's weights, or ``None`` when one can.

        A site is mergeable when it runs on its module's own input (no ``entry``) and the
        module has a ``weight``, and that weight is either a projection's (``weight`` is
        set: Linear, ``Conv1D``, Conv, a slice of a fused projection) or an affine norm's
        1-D scale (``role == "norm"``, or an ``nn.LayerNorm``, ``nn.GroupNorm``,
        ``nn.RMSNorm``, a Hugging Face ``*RMSNorm`` or a batch norm), or a convolution that
        is no projection (a grouped or depthwise one, whose weight still holds one slice per
        output channel, so a per-channel scale and shift fold into it).
        :meth:`DeltaModule.merged` then receives :meth:`weight_views` of it."""
        if self.entry is not None or self.parameter("weight") is None:
            return (
                f"site {self.name!r} ({self.role or 'module'}) has no weight to fold the delta into"
            )
        if self.weight is None and self.role != "norm" and not _is_affine(self.module):
            if not isinstance(self.module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                return f"site {self.name!r} is not a projection, a convolution or a norm"
        w = self.parameter("weight")
        codec = weight_codec(w, self.module)
        if codec is not None:
            why = codec.requantize_refusal(self.module, w)  # type: ignore[arg-type]
            if why is not None:
                return (
                    f"site {self.name!r} is a quantized {codec.name} layer: {why}. Merge on a "
                    "full-precision base instead: save the adapter, unload(), dequantize the "
                    "backbone (unipeft.quantization.dequantize_model) and load the adapter there"
                )
        return None

    def reference_tensor(self) -> torch.Tensor:
        """A tensor whose dtype and device new delta parameters should follow.

        On a quantized layer: an empty tensor of the layer's compute dtype (of its other
        floating parameters, or float32, when it computes in its input's dtype) on the
        weight's device; never the packed storage."""
        w = self.parameter("weight")
        codec = weight_codec(w, self.module)
        if codec is not None:
            assert w is not None
            dtype = codec.compute_dtype(self.module, w)
            if dtype is None:
                others = [p for p in self.module.parameters() if p is not w]
                floats = [p.dtype for p in others if p.is_floating_point()]
                dtype = floats[0] if floats else torch.float32
            return torch.empty(0, dtype=dtype, device=w.device)
        for owner in (self.module, self.host, self.entry):
            if owner is None:
                continue
            for p in owner.parameters():
                if p.is_floating_point():
                    return p
        return torch.empty(0)


@dataclass(frozen=True, eq=False)
class SequenceSite:
    """The token sequence of one transformer stack (for soft prompts).

    Prompts are inserted at ``index`` (after the class token on vision models) at
    ``insert`` and removed again at ``strip`` so that the backbone's outputs keep their shape.
    ``style`` says how the map hooks in:

    - ``"container"``: ``insert`` and ``strip`` are one module taking the sequence as first
      argument and returning it; an ``attn_mask`` keyword of shape ``(L, L)`` is widened;
    - ``"between"``: prompts are inserted into the *output* of ``insert`` and removed from
      the *input* of ``strip`` (or its output when ``strip_output`` is true);
    - ``"hf_text"``: ``insert`` is a Hugging Face base model; ``input_ids`` are embedded with
      its input embeddings, prompts inserted and ``attention_mask`` extended, and the
      model's sequence outputs stripped.
    """

    name: str
    tower: str | None
    features: int
    insert: nn.Module = field(repr=False)
    strip: nn.Module = field(repr=False)
    index: int
    style: Literal["container", "between", "hf_text"]
    batch_first: bool = True
    strip_output: bool = False
    role: str = "tokens"
    layer: int | None = None
    embedding: nn.Module | None = field(default=None, repr=False)
    max_length: int | None = None
    """The most positions the sequence holds, soft tokens included (the size of a learned
    position table the tokens pass through), or ``None`` when nothing bounds it. Methods
    that insert tokens check their count against it (:attr:`Method.size_check`)."""
    attends: bool = True
    """Whether the layers after the sequence attend over it, so that keys and values can be
    prepended to their attention (prefix tuning). ``False`` on a state-space model's token
    sequence: soft tokens go in front of it, but there is no attention to extend."""

    kind = "sequence"

    @property
    def path(self) -> str:
        return self.name

    def reference_tensor(self) -> torch.Tensor:
        for p in self.insert.parameters():
            if p.is_floating_point():
                return p
        for p in self.strip.parameters():
            if p.is_floating_point():
                return p
        return torch.empty(0)


Site = ModuleSite | SequenceSite


def _is_affine(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.RMSNorm):
        return True
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return True
    # Hugging Face's RMS norms (LlamaRMSNorm...) are their own classes with a 1-D scale
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and getattr(weight, "ndim", 0) == 1
