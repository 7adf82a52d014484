"""Adapters on quantized bases with CUDA kernels: bitsandbytes NF4 (double quantization) and
int8, torchao float8, in bf16 compute; LoRA in float32 beside it; PEFT's QLoRA beside
unipeft's; the QLoRA benchmark at a small size.

Run with ``pytest -m gpu tests/test_gpu_quantized.py`` on a machine with CUDA; the default
run deselects these. Every check compares with the dequantized bf16 twin of the model, with
PEFT, or with the bytes before training.
"""

from __future__ import annotations

import pytest
import torch
from _quantized import (
    METHODS,
    dequantized_twin,
    lm_loss,
    needs,
    perturb_,
    quantize,
    quantized_state,
    tiny_llama,
)

import unipeft
from unipeft import quantization as Q

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::unipeft.quantization.QuantizedMergeWarning"),
]

DEVICE = "cuda"
BF16 = torch.bfloat16
# bf16 activations: the same weights through different kernels round differently
TOL = {"nf4-dq": 6e-2, "int8": 1.5e-1, "torchao-fp8": 6e-2}


def _model(kind: str, device: str = DEVICE) -> torch.nn.Module:
    return quantize(tiny_llama(hidden=128), kind, compute_dtype=BF16, device=device, dtype=BF16)


def _ids(device: str = DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, 128, (2, 16), generator=g).to(device)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bottleneck_adapter"])
@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "torchao-fp8"])
def test_bf16_outputs_equal_the_dequantized_twin(
    kind: str, method: str, device: str = DEVICE
) -> None:
    model = _model(kind, device)
    twin = dequantized_twin(model)
    ids = _ids(device)
    torch.manual_seed(3)
    qm = unipeft.apply(model, method, **METHODS[method])
    torch.manual_seed(3)
    rm = unipeft.apply(twin, method, **METHODS[method])
    # deltas take the layer's compute dtype; bitsandbytes' int8 layer computes in its
    # input's, so without a bias to follow they are float32 there
    want = torch.float32 if kind == "int8" else BF16
    for p in qm.deltas.parameters():
        assert p.device.type == torch.device(device).type and p.dtype == want
    qm.deltas.to(BF16)
    perturb_(qm)
    perturb_(rm)
    with torch.no_grad():
        got, want = qm(ids).logits.float(), rm(ids).logits.float()
    torch.testing.assert_close(got, want, atol=TOL[kind], rtol=0)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_float32_lora_trains_beside_bf16_compute(kind: str, device: str = DEVICE) -> None:
    model = _model(kind, device)
    Q.prepare_quantized(model, upcast="all", gradient_checkpointing=True)
    before = quantized_state(model)
    dm = unipeft.apply(model, "lora", r=8, targets=list(METHODS["lora"]["targets"]))
    dm.deltas.float()
    dm.train()
    ids = _ids(device)
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        with torch.autocast(torch.device(device).type, dtype=BF16):
            loss = lm_loss(dm, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in dm.deltas.parameters())
    after = quantized_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_and_unmerge_on_the_gpu(device: str = DEVICE) -> None:
    model = _model("nf4-dq", device)
    before = quantized_state(model)
    dm = unipeft.apply(model, "lora", **METHODS["lora"])
    perturb_(dm, scale=0.05)
    ids = _ids(device)
    with torch.no_grad():
        unmerged = dm(ids).logits
    with pytest.warns(Q.QuantizedMergeWarning):
        dm.merge()
    errors = Q.merge_errors(dm)
    assert errors and all(0 < e < 1 for e in errors.values())
    dm.unmerge()
    assert all(torch.equal(before[k], v) for k, v in quantized_state(model).items())
    with torch.no_grad():
        assert torch.equal(dm(ids).logits, unmerged)


def test_lora_equals_peft_qlora(tmp_path, device: str = DEVICE) -> None:
    needs("nf4-dq")
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        _model("nf4-dq", device),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    ids = _ids(device)
    with torch.no_grad():
        want = pm(input_ids=ids).logits.float()
    pm.save_pretrained(str(tmp_path))
    dm = unipeft.interop.peft.load(_model("nf4-dq", device), str(tmp_path))
    dm.deltas.float()  # PEFT keeps LoRA in float32 on 4-bit layers
    with torch.no_grad():
        got = dm(ids).logits.float()
    torch.testing.assert_close(got, want, atol=6e-2, rtol=0)


def test_qlora_bench_at_a_small_size(device: str = DEVICE) -> None:
    pytest.importorskip("peft")
    from unipeft.bench import qlora

    cfg = qlora.make_config(model="llama", device=device, layers=2, steps=2, warmup=1, length=128)
    result = qlora.run(cfg)
    rows = result["rows"]
    assert rows.keys() == {"unipeft", "peft"}
    for row in rows.values():
        assert row["peak_gib"] > row["model_gib"] > 0
        assert row["trainable_dtypes"] == ["float32"]
    assert rows["unipeft"]["trainable"] == rows["peft"]["trainable"]
    assert rows["unipeft"]["first_loss"] == pytest.approx(rows["peft"]["first_loss"], abs=2e-2)
