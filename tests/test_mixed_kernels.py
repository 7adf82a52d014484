"""Mixed batches over many adapters (``lora/mixed.py``, ``dora_mixed.py``) compute what the
per-group path computes: each kernel (masked, BGMV, SGMV), for LoRA and DoRA, with 1, 3
and 64 adapters of unequal ranks and samples routed to the plain backbone; DoRA's mixed
batch equals DoRA's single-adapter forward sample by sample; the dispatch rule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import unipeft
from unipeft.methods.reparameterized.dora import DoraDelta
from unipeft.methods.reparameterized.lora import LoraDelta
from unipeft.methods.reparameterized.lora import mixed as mixed_mod
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import perturb

ALL = ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down"]
BERT_ALL = ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.down"]
TOL = {"atol": 2e-5, "rtol": 2e-5}
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _model(method: str, k: int, backbone: str = "llama") -> unipeft.DeltaModel:
    """``k`` adapters ``a0…`` of ranks 2, 3, 4, 2, 3, … (q and down only when there are many),
    factors and magnitudes moved away from their init."""
    targets = (ALL if backbone == "llama" else BERT_ALL) if k <= 3 else ["attn.q", "mlp.down"]
    torch.manual_seed(0)
    model = unipeft.apply(
        BACKBONES[backbone].make(), method, r=2, targets=targets, adapter_name="a0"
    )
    for i in range(1, k):
        model.add_adapter(f"a{i}", method, r=2 + i % 3, targets=targets)
    perturb(model, seed=3, scale=0.2)
    return model


def _routing(k: int, n: int) -> list[str]:
    """Sample ``i`` through adapter ``(7 i) mod k``, every fifth sample through the base:
    unsorted, every adapter used when ``n`` allows."""
    return ["__base__" if i % 5 == 4 else f"a{(7 * i) % k}" for i in range(n)]


def _ids(n: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (n, 5), generator=gen).to(device)}


@contextlib.contextmanager
def _per_group() -> Iterator[None]:
    """The reference: no class batches, each adapter runs on its own samples."""
    saved = LoraDelta.__dict__["mixed"], DoraDelta.__dict__["mixed"]
    LoraDelta.mixed = staticmethod(lambda *args: None)  # type: ignore[method-assign]
    DoraDelta.mixed = staticmethod(lambda *args: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        LoraDelta.mixed, DoraDelta.mixed = saved  # type: ignore[method-assign]


class _Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.grouped = 0
        real = torch._grouped_mm

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.grouped += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "_grouped_mm", counted)


def _hidden(model: unipeft.DeltaModel, inputs: dict, names: list[str]) -> torch.Tensor:
    return model(**inputs, adapter_names=names).last_hidden_state


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("k", [1, 3, 64])
@pytest.mark.parametrize("kernel", ["masked", "bgmv", "sgmv"])
def test_each_kernel_equals_the_per_group_path(
    method: str, k: int, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(method, k)
    n = max(2 * k, 6) if k < 64 else 80
    names, inputs = _routing(k, n), _ids(n)
    sgmv_here = mixed_mod.grouped_mm_works(CPU, torch.float32)  # probed before counting
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        with _per_group():
            expected = _hidden(model, inputs, names)
        with mixed_mod.use_kernel(kernel):
            got = _hidden(model, inputs, names)
            again = _hidden(model, inputs, names)  # the routing's order/mask, cached
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(again, expected, **TOL)
    assert (counter.grouped > 0) == (kernel == "sgmv" and sgmv_here)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize(
    "names",
    [
        ["a0", "a0", "a1", "a2", "a2", "__base__"],
        ["a0", "a1", "a2", "__base__"],  # no more samples than slots: BGMV keeps its gather
    ],
)
def test_sorted_routing_and_factor_changes_are_followed(method: str, names: list[str]) -> None:
    """A sorted routing (SGMV without a permutation), then an in-place change of one
    adapter's factors and magnitude, seen by the next call of every kernel."""
    model = _model(method, 3)
    inputs = _ids(len(names))
    with torch.no_grad():
        for kernel in ("masked", "bgmv", "sgmv"):
            with mixed_mod.use_kernel(kernel):
                _hidden(model, inputs, names)  # fills the caches
            for p in model.deltas["a2"].parameters():
                p.mul_(1.5)
            with _per_group():
                expected = _hidden(model, inputs, names)
            with mixed_mod.use_kernel(kernel):
                got = _hidden(model, inputs, names)
            torch.testing.assert_close(got, expected, **TOL, msg=kernel)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("backbone", ["llama", "bert"])  # BERT: biases, DoRA's (1 - g) b
def test_a_mixed_batch_equals_each_sample_through_its_adapter(method: str, backbone: str) -> None:
    model = _model(method, 3, backbone)
    names = ["a2", "__base__", "a0", "a1", "a2"]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (len(names), 6), generator=gen)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).last_hidden_state
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable():
                    one = model(input_ids=ids[i : i + 1]).last_hidden_state
            else:
                model.set_active(name)
                one = model(input_ids=ids[i : i + 1]).last_hidden_state
            torch.testing.assert_close(mixed[i : i + 1], one, **TOL, msg=f"sample {i}")


def test_dora_mixed_batch_runs_its_fast_path_and_keeps_the_gains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DoRA hook answers (no per-group fallback), and the gains are computed once while
    nothing changes, again after the base weight changes."""
    from unipeft.methods.reparameterized import dora_mixed

    model = _model("dora", 3)
    names, inputs = _routing(3, 6), _ids(6)
    built, answered = [], []
    real_gains, real_hook = dora_mixed._Gains, dora_mixed.mixed_batch

    def gains(*args):  # type: ignore[no-untyped-def]
        built.append(1)
        return real_gains(*args)

    def hook(*args):  # type: ignore[no-untyped-def]
        out = real_hook(*args)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(dora_mixed, "_Gains", gains)
    monkeypatch.setattr(dora_mixed, "mixed_batch", hook)
    sites = len(model.adapters["a0"].attachments)
    with torch.no_grad():
        first = _hidden(model, inputs, names)
        _hidden(model, inputs, names)
        assert len(built) == sites and answered and all(answered)
        weight = model.base_model.layers[0].self_attn.q_proj.weight
        weight.mul_(0.5)  # one site's base weight: its gains are recomputed
        with _per_group():
            expected = _hidden(model, inputs, names)
        got = _hidden(model, inputs, names)
    assert len(built) == sites + 1
    assert not torch.allclose(first, got)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_with_gradients_the_mixed_batch_stays_differentiable(method: str) -> None:
    """LoRA: the BGMV path (differentiable) whatever kernel is asked for; DoRA: the
    per-group path. Gradients equal the per-group path's."""
    grads = []
    for reference in (True, False):
        model = _model(method, 3)
        model.train()
        names, inputs = _routing(3, 6), _ids(6)
        ctx = _per_group() if reference else mixed_mod.use_kernel("masked")
        with ctx:
            out = model(**inputs, adapter_names=names).last_hidden_state
            # not the square: the final RMSNorm makes that constant, its gradient noise
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(
            grads[1][name], g, atol=2e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_the_dispatch_rule() -> None:
    def choose(total: int, samples: int, adapters: int, tokens: int, d_out: int = 2048) -> str:
        return mixed_mod.choose_kernel(total, 16, samples, adapters, tokens, 2048, d_out, CUDA)

    assert mixed_mod.choose_kernel(128, 16, 64, 8, 512, 64, 64, CPU) == "bgmv"  # the CPU
    assert choose(128, 8, 8, 512) == "bgmv"  # sample i → adapter i: gathers kept
    assert choose(1024, 64, 64, 128) == "bgmv"
    assert choose(128, 64, 8, 512) == "masked"  # 8 adapters of r=16, 64 samples
    assert choose(1024, 256, 64, 128) == "bgmv"  # 64 adapters, prefill
    assert choose(1024, 256, 64, 1) == "sgmv"  # 64 adapters, decoding
    assert choose(1024, 256, 64, 16, d_out=512) == "sgmv"  # 16·512 < 16·2560
    with pytest.raises(mixed_mod.MixedKernelError, match="use one of"):
        with mixed_mod.use_kernel("cutlass"):
            pass
    with mixed_mod.use_kernel("sgmv"):
        assert mixed_mod._forced == "sgmv"
    assert mixed_mod._forced == "auto"


def test_the_grouped_mm_probe_says_no_for_a_dtype_it_cannot_take() -> None:
    assert mixed_mod.grouped_mm_works(CPU, torch.int64) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kernel", ["masked", "bgmv", "sgmv", "auto"])
def test_kernels_on_cuda_in_bf16(method: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel on the GPU in bf16 against the per-group path, 64 adapters; SGMV runs
    ``torch._grouped_mm`` there (the probe passes on sm90 with torch ≥ 2.8)."""
    assert mixed_mod.grouped_mm_works(CUDA, torch.bfloat16)
    model = _model(method, 64).to(device="cuda", dtype=torch.bfloat16)
    names, inputs = _routing(64, 80), _ids(80, "cuda")
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        with _per_group():
            expected = _hidden(model, inputs, names).float()
        with mixed_mod.use_kernel(kernel):
            got = _hidden(model, inputs, names).float()
    # bf16 through every layer: the kernels sum in other orders, so single elements of the
    # hidden state may differ by a few bf16 steps (0.04 measured on the H200); a wrong
    # kernel moves them by O(1) and the mean
    torch.testing.assert_close(got, expected, atol=8e-2, rtol=3e-2)
    assert (got - expected).abs().mean() < 5e-3
    if kernel != "auto":  # (auto: SGMV here, 5-token samples; the rule is tested above)
        assert (counter.grouped > 0) == (kernel == "sgmv")


@pytest.mark.slow  # ~4 s; tests/test_bench_perf.py runs the section through run_perf
def test_the_bench_section_on_a_tiny_llama() -> None:
    """``unipeft bench perf``'s mixed-batch section: four figures, ratios from the figures,
    the libraries agreeing on LoRA, PEFT's refusal recorded for DoRA, report rows."""
    pytest.importorskip("peft")
    from dataclasses import replace

    from unipeft.bench import perf_mixed
    from unipeft.bench.perf_report import Row
    from unipeft.bench.perf_setup import _llama_workload, _quiet, quick_config

    tiny = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    tiny.update(num_key_value_heads=1, intermediate_size=128, vocab_size=256)
    cfg = replace(quick_config("cpu"), llama=tiny, batch=4, length=32, repeats=1, warmup=0)
    with _quiet():
        figs = perf_mixed.mixed_section(
            _llama_workload(cfg), cfg, lambda _: None, {}, counts=(2, 4)
        )
    assert set(figs) == {
        "mixed_batch",
        "mixed_batch_many",
        "mixed_batch_dora",
        "mixed_batch_dora_many",
    }
    for name, f in figs.items():
        many = name.endswith("_many")
        assert (f["adapters"], f["batch"], f["length"]) == ((4, 4, 8) if many else (2, 4, 32))
        assert f["unipeft_mixed_to_single"] == pytest.approx(
            f["unipeft_mixed_ms"] / f["unipeft_single_ms"]
        )
        assert f["unipeft_kernels_ms"]["bgmv"] > 0 and f["auto_kernels"]
        assert f["mixed_vs_per_sample"] < 1e-4
        assert many or (f["more_samples"]["batch"] == 4 and f["more_samples"]["unipeft_single_ms"])
        assert f["single_agreement"]["max_abs_diff"] < 1e-4  # DoRA too: same magnitudes
        if f["method"] == "LoRA":
            assert f["agreement"]["max_abs_diff"] < 1e-4 < f["agreement"]["output_max_abs"]
            assert f["peft_mixed_to_single"] == pytest.approx(
                f["peft_mixed_ms"] / f["peft_single_ms"]
            )
        elif f["peft_mixed_ms"] is None:  # PEFT 0.21 refuses DoRA in a mixed batch
            assert "DoRA" in f["peft_mixed_refused"] and f["peft_single_ms"] > 0
    tables = perf_mixed.mixed_report_rows(figs, {})
    assert [title for title, _ in tables] == [
        "mixed batch, LoRA, Llama",
        "mixed batch, DoRA, Llama",
    ]
    rows = [Row(**cells) for cells in tables[0][1]]  # the report's Row takes them
    assert any("adapter i mod 4" in r.figure and r.unipeft.endswith("ms") for r in rows)
