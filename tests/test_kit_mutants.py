"""The kit catches real bugs: each test plants one into a correct method (LoRA) and shows
that the check made for that kind of bug fails on it, while the correct method passes, and
(where one exists) that an older check lets it through.

The buggy methods are registered in this process's registry for the test only. Their
records, functions and classes live at module level here, so that the fresh interpreter of
``fresh_interpreter_load`` can unpickle them by reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, settings
from torch import Tensor

from unipeft.contract.deltas import ProjectionShape
from unipeft.contract.errors import AdapterError
from unipeft.contract.method import Method
from unipeft.methods.reparameterized.lora import METHOD as LORA
from unipeft.methods.reparameterized.lora import LoraConfig, LoraDelta
from unipeft.model import DeltaModel
from unipeft.runtime.registry import registry
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import INVARIANTS
from unipeft.testing.lifecycle import run_lifecycle
from unipeft.testing.pytest_plugin import hypothesis_profile, lifecycle_settings
from unipeft.testing.runner import check

BERT = BACKBONES["bert"]
CFG = LoraConfig(r=4, alpha=8.0)


def _shape(site: Any) -> ProjectionShape:
    return ProjectionShape.of(site)


class _HookPath(LoraDelta):
    """LoRA without its fused kernels and shared projections: each bug below is the only
    thing that differs from plain ``y + s · B A x``."""

    @staticmethod
    def link(attachments: list) -> None:
        return None

    def fused_linear(self, *args: Any) -> Tensor | None:
        return None

    def update_(self, x: Tensor | None, y: Tensor) -> Tensor:
        return self(x, y)

    @staticmethod
    def update_slices(*args: Any) -> Tensor | None:
        return None


# (i) a frozen random projection, drawn once per shape into a class-level cache -----------
_PROJECTIONS: dict[tuple[int, int], Tensor] = {}


class FrozenProjectionDelta(_HookPath):
    """LoRA with ``A`` a frozen random projection (only ``B`` trains). The projection comes
    from a cache filled from the global generator, so every load in this process gets the
    same one; the bug: it is a ``persistent=False`` buffer, so it is not saved."""

    saved = False

    def __init__(self, shape: ProjectionShape, r: int, alpha: float) -> None:
        super().__init__(shape, r, alpha)
        key = (r, shape.in_features)
        if key not in _PROJECTIONS:
            _PROJECTIONS[key] = torch.randn(r, shape.in_features) / shape.in_features**0.5
        del self.A
        self.register_buffer("A", _PROJECTIONS[key].clone(), persistent=self.saved)


class SavedProjectionDelta(FrozenProjectionDelta):
    saved = True  # the fix: the projection is saved with the adapter


def _b_only(cfg: LoraConfig, site: Any) -> int:
    return cfg.r * _shape(site).out_features


def _build_unsaved(cfg: LoraConfig, site: Any) -> LoraDelta:
    return FrozenProjectionDelta(_shape(site), cfg.r, cfg.alpha)


def _build_saved(cfg: LoraConfig, site: Any) -> LoraDelta:
    return SavedProjectionDelta(_shape(site), cfg.r, cfg.alpha)


UNSAVED_PROJECTION = replace(LORA, id="mut_unsaved_projection", build=_build_unsaved,
                             num_parameters=_b_only)  # fmt: skip
SAVED_PROJECTION = replace(LORA, id="mut_saved_projection", build=_build_saved,
                           num_parameters=_b_only)  # fmt: skip


# (ii) a delta computed and returned in float32 ---------------------------------------------
class Float32Delta(_HookPath):
    """Upcasts "for stability" and returns ``y`` promoted to float32."""

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        h = F.linear(x.float(), self.A.float())
        return y + (h @ self.B.float().t()) * self.scaling


def _build_float32(cfg: LoraConfig, site: Any) -> LoraDelta:
    return Float32Delta.from_config(cfg, _shape(site))  # type: ignore[return-value]


FLOAT32 = replace(LORA, id="mut_float32", build=_build_float32)


# (iii) dropout on the base path ------------------------------------------------------------
class BaseDropoutDelta(_HookPath):
    """Applies the adapter's dropout to the site's output instead of the adapter's input."""

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        return super().forward(x, self.dropout(y))


def _build_base_dropout(cfg: LoraConfig, site: Any) -> LoraDelta:
    return BaseDropoutDelta.from_config(cfg, _shape(site))  # type: ignore[return-value]


BASE_DROPOUT = replace(LORA, id="mut_base_dropout", build=_build_base_dropout)


# (iv) a rank silently clamped to the input width ---------------------------------------------
def _build_clamped(cfg: LoraConfig, site: Any) -> LoraDelta:
    shape = _shape(site)
    return LoraDelta(shape, min(cfg.r, shape.in_features), cfg.alpha, cfg.dropout)


# a plugin that declares no size limit (LoRA's own refuses r above the width at apply) and
# quietly clamps instead
CLAMPED = replace(LORA, id="mut_clamped_rank", build=_build_clamped, size_check=None)


# (v) build() leaves an attribute on the backbone's module -----------------------------------
def _build_annotating(cfg: LoraConfig, site: Any) -> LoraDelta:
    site.module.lora_rank = cfg.r  # "for a later lookup"; nothing removes it
    return LORA.build(cfg, site)


ANNOTATING = replace(LORA, id="mut_annotating", build=_build_annotating)


# (vi) a mixed-batch cache keyed on the parameters' ids -------------------------------------
class StackCacheDelta(_HookPath):
    """A mixed-batch path that stacks every adapter's factors and, in the bug, keeps the
    stacks while the same parameter objects come back: an in-place step changes the
    values but not the objects."""

    cached = True

    @classmethod
    def mixed(
        cls, deltas: list, x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
    ) -> Tensor | None:
        if x is None or any(d.drops for d in deltas):
            return None
        key = tuple(id(p) for d in deltas for p in (d.A, d.B))
        if not cls.cached or cache.get("mut_key") != key:
            r = max(d.r for d in deltas)
            a = [F.pad(d.A, (0, 0, 0, r - d.r)) for d in deltas]
            b = [F.pad(d.B * d.scaling, (0, r - d.r)) for d in deltas]
            a.append(a[0].new_zeros(r, x.shape[-1]))  # the slot of samples without one here
            b.append(b[0].new_zeros(y.shape[-1], r))
            cache.update(mut_key=key, mut_a=torch.stack(a).detach(), mut_b=torch.stack(b).detach())
        a, b = cache["mut_a"], cache["mut_b"]
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a[slots].transpose(1, 2))
        return y + torch.bmm(h, b[slots].transpose(1, 2)).reshape(y.shape)


class UncachedStackDelta(StackCacheDelta):
    cached = False  # the fix: stack the current values on every call


def _build_stale(cfg: LoraConfig, site: Any) -> LoraDelta:
    return StackCacheDelta.from_config(cfg, _shape(site))  # type: ignore[return-value]


def _build_uncached(cfg: LoraConfig, site: Any) -> LoraDelta:
    return UncachedStackDelta.from_config(cfg, _shape(site))  # type: ignore[return-value]


STALE_CACHE = replace(LORA, id="mut_stale_cache", build=_build_stale)
NO_CACHE = replace(LORA, id="mut_no_cache", build=_build_uncached)

MUTANTS = (UNSAVED_PROJECTION, SAVED_PROJECTION, FLOAT32, BASE_DROPOUT, CLAMPED, ANNOTATING,
           STALE_CACHE, NO_CACHE)  # fmt: skip


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for method in MUTANTS:
        monkeypatch.setitem(registry().methods, method.id, method)
    yield


def fails(invariant: str, method: Method, cfg: LoraConfig = CFG) -> str:
    with pytest.raises(AssertionError) as info:
        INVARIANTS[invariant](method, BERT, cfg)
    return str(info.value)


def test_fresh_interpreter_catches_an_unsaved_random_projection() -> None:
    # in this process the cache hands the load the same projection: the old check passes
    INVARIANTS["save_load_roundtrip"](UNSAVED_PROJECTION, BERT, CFG)
    message = fails("fresh_interpreter_load", UNSAVED_PROJECTION)
    assert "loaded in a fresh interpreter vs here: not bit-identical" in message
    INVARIANTS["fresh_interpreter_load"](SAVED_PROJECTION, BERT, CFG)


def test_half_precision_catches_a_float32_delta_on_a_bf16_backbone() -> None:
    INVARIANTS["dtype_follows_backbone"](FLOAT32, BERT, CFG)  # float64 wins the promotion
    message = fails("half_precision", FLOAT32)
    assert "torch.bfloat16" in message
    INVARIANTS["half_precision"](LORA, BERT, CFG)


def test_train_mode_catches_dropout_on_the_base_path() -> None:
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.1)
    INVARIANTS["identity_at_init"](BASE_DROPOUT, BERT, cfg)  # eval mode: no dropout
    assert "train-mode output at initialisation" in fails("train_mode", BASE_DROPOUT, cfg)
    INVARIANTS["train_mode"](LORA, BERT, cfg)


def test_sizes_above_the_width_catch_a_clamped_rank() -> None:
    INVARIANTS["trainable_count"](CLAMPED, BERT, LoraConfig(r=8))  # the old sizes: r <= 8
    fast = settings(settings.get_profile(hypothesis_profile()), report_multiple_bugs=False)
    with pytest.raises(AssertionError, match="trainable parameters, but the formula"):
        check(CLAMPED, BERT, "trainable_count", fast)
    check(LORA, BERT, "trainable_count", fast)


def test_unload_check_catches_an_attribute_left_on_a_module() -> None:
    INVARIANTS["unload_restores"](ANNOTATING, BERT, CFG)  # state dict and hooks are clean
    message = fails("unload_leaves_no_trace", ANNOTATING)
    assert "attributes differ after unload: added ['lora_rank']" in message
    INVARIANTS["unload_leaves_no_trace"](LORA, BERT, CFG)


def test_mixed_batch_after_step_catches_a_cache_keyed_on_parameter_ids() -> None:
    INVARIANTS["mixed_batch_matches"](STALE_CACHE, BERT, CFG)  # no step: the cache is fresh
    assert "after an in-place change (optimizer)" in fails("mixed_batch_after_step", STALE_CACHE)
    INVARIANTS["mixed_batch_after_step"](NO_CACHE, BERT, CFG)


def _delete_even_if_active(self: DeltaModel, name: str) -> None:
    """A regression of ``delete_adapter``: the check that the adapter is inactive is gone,
    so deleting the active adapter leaves its name in the active set."""
    self.get_adapter(name)
    self._remove_adapter(name)


def test_state_machine_catches_deleting_the_active_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quick = settings(lifecycle_settings(), max_examples=6, phases=[Phase.explicit, Phase.generate],
                     report_multiple_bugs=False)  # fmt: skip
    run_lifecycle(LORA, BERT, quick)
    monkeypatch.setattr(DeltaModel, "delete_adapter", _delete_even_if_active)
    INVARIANTS["adapters_isolated"](LORA, BERT, CFG)  # it deletes an inactive adapter only
    with pytest.raises(AssertionError, match=r"delete_adapter\('\w+'\) was accepted"):
        run_lifecycle(LORA, BERT, quick)


def test_state_machine_refusals_are_adapter_errors() -> None:
    """The machine's expectation matches the real model: deleting the active adapter is
    refused with AdapterError (so the test above fails only because of the planted bug)."""
    import unipeft

    model = unipeft.apply(BERT.make(), "lora", r=2)
    with pytest.raises(AdapterError, match="is active"):
        model.delete_adapter("default")
