"""transformers' Mamba: its structure map, the map's default targets, what each family of
methods does there, and the weights the mixer reads directly (``dt_proj``, ``conv1d``), which
the effective-weight host adapts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _matrix import role_sites
from torch import nn

import unipeft
from unipeft import DeltaModel
from unipeft.contract.errors import TargetError
from unipeft.contract.sites import ModuleSite
from unipeft.maps.ssm import MAMBA_MAP, mixer_calls
from unipeft.testing.backbones import BACKBONES

transformers = pytest.importorskip("transformers")
MAMBA = BACKBONES["mamba"]


def _lora_matches_hand_update(backbone: nn.Module, layer: int, role: str, rel: str) -> DeltaModel:
    """LoRA (r=2, alpha=4: scale 2) on ``role`` of block ``layer`` equals the same Mamba
    with ``W + 2 * B @ A`` written into the mixer's ``rel`` weight by hand."""
    model = unipeft.apply(backbone, "lora", r=2, alpha=4, targets=[f"{role}[{layer}]"])
    delta = model.adapters["default"].delta_at(f"layers.{layer}:{role}")
    for p in delta.parameters():
        nn.init.normal_(p, std=0.3)
    reference = MAMBA.make()
    with torch.no_grad():
        a, b = (p for n, p in sorted(delta.named_parameters()))  # lora_A, lora_B
        reference.layers[layer].mixer.get_submodule(rel).weight += 2.0 * b @ a
        x = MAMBA.sample(0)
        torch.testing.assert_close(MAMBA.run(model, x), MAMBA.run(reference, x))
    return model


def test_tiny_mamba_roles_and_widths() -> None:
    model = MAMBA.make()
    assert unipeft.pick_map(model, unipeft.registry().sorted_maps()).name == "transformers-mamba"
    roles = role_sites(model)
    assert roles["ssm.in"] == ["layers.0:ssm.in", "layers.1:ssm.in"]
    assert roles["ssm.x"] == ["layers.0:ssm.x", "layers.1:ssm.x"]
    assert roles["ssm.out"] == ["layers.0:ssm.out", "layers.1:ssm.out"]
    assert roles["mixer"] == ["layers.0:mixer", "layers.1:mixer"]
    assert roles["ssm.dt"] == ["layers.0:ssm.dt", "layers.1:ssm.dt"]
    assert roles["ssm.conv"] == ["layers.0:ssm.conv", "layers.1:ssm.conv"]
    assert roles["norm"] == ["layers.0.norm", "layers.1.norm"]
    assert roles["embed"] == ["embeddings"] and roles["tokens"] == ["tokens"]
    sites = {s.name: s for s in unipeft.inspect_sites(model)}
    assert (sites["layers.0:ssm.dt"].in_features, sites["layers.0:ssm.dt"].features) == (4, 32)
    assert sites["layers.0:ssm.conv"].features == 32 and sites["layers.0:ssm.conv"].weight is None
    # in_proj: hidden 16 -> 2 x inner 32 (SSM input and gate); x_proj: inner -> rank 4 + 2 x 4
    assert (sites["layers.0:ssm.in"].in_features, sites["layers.0:ssm.in"].features) == (16, 64)
    assert (sites["layers.0:ssm.x"].in_features, sites["layers.0:ssm.x"].features) == (32, 12)
    assert sites["layers.1:ssm.out"].features == 16
    assert sites["layers.0:mixer"].path == "layers.0.mixer"
    assert sites["layers.0:block"].features == 16  # the block's width, not 0 (unknown)


def test_a_realistic_causal_lm_is_found_under_its_prefix() -> None:
    config = transformers.MambaConfig(  # state-spaces/mamba-130m's shapes, on the meta device
        hidden_size=768, num_hidden_layers=24, state_size=16, vocab_size=50280, conv_kernel=4
    )
    with torch.device("meta"):
        model = transformers.MambaForCausalLM(config)
    roles = role_sites(model)
    assert len(roles["ssm.in"]) == 24 and roles["ssm.in"][0] == "backbone.layers.0:ssm.in"
    assert roles["embed"] == ["backbone.embeddings"]
    sites = {s.name: s for s in unipeft.inspect_sites(model)}
    assert sites["backbone.layers.23:ssm.in"].features == 2 * 1536
    assert sites["backbone.layers.23:ssm.x"].features == 48 + 2 * 16  # rank ceil(768/16)
    assert sites["backbone.layers.5:mixer"].features == 768


def test_mamba2_in_and_out_projections_and_its_gated_norm() -> None:
    config = transformers.Mamba2Config(
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        vocab_size=50,
        expand=2,
        head_dim=8,
        num_heads=4,
        n_groups=1,
        conv_kernel=3,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.Mamba2Model(config)
    roles = role_sites(model)
    assert roles["ssm.in"] == ["layers.0:ssm.in", "layers.1:ssm.in"]
    assert roles["norm"] == [
        "layers.0.norm",
        "layers.0.mixer.norm",
        "layers.1.norm",
        "layers.1.mixer.norm",
    ]
    assert not {"ssm.x", "ssm.dt"} & set(roles)
    assert roles["ssm.conv"] == ["layers.0:ssm.conv", "layers.1:ssm.conv"]  # depthwise
    ids = torch.randint(0, 50, (2, 6))
    adapted = unipeft.apply(model, "lora", r=2)
    assert [s.role for s in adapted.adapters["default"].sites] == ["ssm.in"] * 2 + ["ssm.out"] * 2
    for p in adapted.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        out = adapted(input_ids=ids).last_hidden_state
        with adapted.disable():
            assert not torch.allclose(adapted(input_ids=ids).last_hidden_state, out)
        adapted.merge()
        torch.testing.assert_close(
            adapted(input_ids=ids).last_hidden_state, out, atol=1e-5, rtol=1e-4
        )


def test_dt_and_conv_are_weights_the_mixer_reads_so_the_mixer_hosts_them() -> None:
    """transformers 5's mixer never calls dt_proj or conv1d (a hook there would never run):
    their sites name the mixer as host and take merged-form methods only."""
    model = MAMBA.make()
    mixer = model.layers[0].mixer
    called: list[str] = []
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d"):
        getattr(mixer, name).register_forward_hook(lambda *a, n=name: called.append(n))
    with torch.no_grad():
        MAMBA.run(model, MAMBA.sample(0))
    model.train()
    MAMBA.run(model, MAMBA.sample(0)).sum().backward()
    assert set(called) == set(mixer_calls(mixer)) == {"in_proj", "x_proj", "out_proj"}
    sites = {s.name: s for s in MAMBA_MAP.sites(model)}
    for name, rel in (("layers.0:ssm.dt", "dt_proj"), ("layers.0:ssm.conv", "conv1d")):
        site = sites[name]
        assert site.host is mixer and site.module is getattr(mixer, rel)
        assert site.merged_form_only is not None and rel in site.merged_form_only
    assert sites["layers.0:ssm.x"].host is None  # called as a module: an ordinary site


class _ModuleCallingMixer(nn.Module):
    """A mixer of Mamba's layout whose forward calls ``conv1d`` and ``dt_proj`` as
    modules, as transformers 4's slow path did (a short selective-scan-free stand-in)."""

    def __init__(self, hidden: int = 8, inner: int = 16, rank: int = 2, state: int = 2) -> None:
        super().__init__()
        self.rank, self.state = rank, state
        self.in_proj = nn.Linear(hidden, 2 * inner)
        self.conv1d = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.out_proj = nn.Linear(inner, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, gate = self.in_proj(hidden_states).chunk(2, dim=-1)
        length = x.shape[1]
        x = torch.nn.functional.silu(self.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)
        dt, _b, _c = self.x_proj(x).split([self.rank, self.state, self.state], dim=-1)
        dt = torch.nn.functional.softplus(self.dt_proj(dt))
        return self.out_proj(x * dt * torch.nn.functional.silu(gate))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mixer = _ModuleCallingMixer()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mixer(self.norm(h))


class _SlowPathMamba(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(20, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(ids)
        for block in self.layers:
            h = block(h)
        return h


def test_falcon_mamba_keeps_the_layout_and_reads_dt_directly() -> None:
    config = transformers.FalconMambaConfig(
        hidden_size=8, state_size=2, num_hidden_layers=1, vocab_size=20, time_step_rank=2
    )
    model = transformers.FalconMambaModel(config)
    model.train()
    sites = MAMBA_MAP.sites(model)
    assert {"ssm.in", "ssm.x", "ssm.out", "mixer"} <= {s.role for s in sites}
    # its forward calls dt_proj only when quantized: the mixer hosts dt and conv
    assert {s.role for s in sites if getattr(s, "host", None) is not None} == {"ssm.dt", "ssm.conv"}
    assert model.training and model.layers[0].mixer.in_proj.training  # the probe restored it


def test_a_mixer_calling_dt_and_conv_as_modules_exposes_them() -> None:
    torch.manual_seed(0)
    model = _SlowPathMamba()
    assert mixer_calls(model.layers[0].mixer) == {
        "in_proj",
        "x_proj",
        "out_proj",
        "dt_proj",
        "conv1d",
    }
    sites = {s.name: s for s in MAMBA_MAP.sites(model)}
    conv, dt = sites["layers.0:ssm.conv"], sites["layers.1:ssm.dt"]
    assert conv.weight is None and conv.channel_dim == 1 and conv.features == 16  # depthwise
    assert dt.weight is not None and (dt.in_features, dt.features) == (2, 16)
    ids = torch.randint(0, 20, (2, 5))
    adapted = unipeft.apply(model, "lora", r=2, targets=["ssm.dt"])
    for p in adapted.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        out = adapted(ids)
        with adapted.disable():
            assert not torch.allclose(adapted(ids), out)  # the delta on dt_proj runs
        adapted.merge()
        torch.testing.assert_close(adapted(ids), out, atol=1e-5, rtol=1e-4)
    # channel-wise scaling of the depthwise convolution's (N, C, L) output, on channels
    scaled = unipeft.apply(_SlowPathMamba(), "ia3", targets=["ssm.x"])
    assert [s.role for s in scaled.adapters["default"].sites] == ["ssm.x", "ssm.x"]
    tuned = unipeft.apply(_SlowPathMamba(), "bitfit", targets=["ssm.conv"])
    assert [s.channel_dim for s in tuned.adapters["default"].sites] == [1, 1]


def test_under_the_fused_cuda_kernel_the_mixer_hosts_every_weight_it_reads(monkeypatch) -> None:
    """In training mode the mamba_ssm kernel reads every mixer weight but in_proj's itself:
    x_proj and out_proj become weights the mixer's effective-weight host adapts too (in eval
    mode, where the mixer calls them, the same host runs them)."""
    import unipeft.maps.ssm as ssm

    monkeypatch.setattr(ssm, "fused_kernels", lambda: True)
    sites = MAMBA_MAP.sites(MAMBA.make())
    hosted = {s.role for s in sites if isinstance(s, ModuleSite) and s.host is not None}
    assert hosted == {"ssm.x", "ssm.out", "ssm.dt", "ssm.conv"}
    assert {s.role for s in sites if isinstance(s, ModuleSite) and s.role == "ssm.in"}
    assert all(s.host is None for s in sites if s.role == "ssm.in")
    _lora_matches_hand_update(MAMBA.make(), 0, "ssm.x", "x_proj")


def test_default_targets_come_from_the_map() -> None:
    lora = unipeft.apply(MAMBA.make(), "lora", r=2)
    assert list(lora.adapters["default"].targets) == ["ssm.in", "ssm.out?"]
    assert [s.role for s in lora.adapters["default"].sites] == ["ssm.in"] * 2 + ["ssm.out"] * 2
    adapter = unipeft.apply(MAMBA.make(), "bottleneck_adapter")
    assert {s.role for s in adapter.adapters["default"].sites} == {"mixer"}
    assert {s.role for s in unipeft.apply(MAMBA.make(), "ia3").adapters["default"].sites} == {
        "ssm.x",
        "ssm.out",
    }
    norms = unipeft.apply(MAMBA.make(), "ln_tuning")
    assert {s.role for s in norms.adapters["default"].sites} == {"norm"}
    # targets a user names are never replaced
    with pytest.raises(TargetError, match=r"'attn.q' matches nothing on MambaModel.*ssm\.in"):
        unipeft.apply(MAMBA.make(), "lora", targets=["attn.q"])


@pytest.mark.parametrize(
    ("method", "config"),
    [("lora", {"r": 2}), ("dora", {"r": 2}), ("ia3", {}), ("ssf", {}), ("bitfit", {})],
)
def test_methods_train_and_merge_on_mamba(method: str, config: dict) -> None:
    x = MAMBA.sample(0)
    model = unipeft.apply(MAMBA.make(), method, **config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    # a fixed target: the mean square of the normalised output is about 1 whatever the weights
    target = torch.randn(
        MAMBA.run(MAMBA.make(), x).shape, generator=torch.Generator().manual_seed(1)
    )
    for _ in range(2):
        loss = (MAMBA.run(model, x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = MAMBA.run(model, x)
        assert not torch.allclose(trained, MAMBA.run(MAMBA.make(), x))  # training moved it
        model.merge()
        torch.testing.assert_close(MAMBA.run(model, x), trained, atol=1e-5, rtol=1e-4)


def test_lora_on_in_proj_matches_a_plain_low_rank_update() -> None:
    """The adapted mixer equals the same Mamba with ``W + scale * B @ A`` written into
    ``in_proj`` by hand."""
    _lora_matches_hand_update(MAMBA.make(), 0, "ssm.in", "in_proj")


def test_prompt_tuning_prepends_tokens_and_saves(tmp_path: Path) -> None:
    x = MAMBA.sample(0)
    model = unipeft.apply(MAMBA.make(), "prompt_tuning", num_tokens=3)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        out = MAMBA.run(model, x)
        assert out.shape == MAMBA.run(MAMBA.make(), x).shape  # the soft tokens are stripped
        assert not torch.allclose(out, MAMBA.run(MAMBA.make(), x))
    model.save(tmp_path)
    loaded = unipeft.load(MAMBA.make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(MAMBA.run(loaded, x), out)


@pytest.mark.parametrize(
    ("method", "targets", "message"),
    [
        ("ssf", ["norm"], "MambaRMSNorm.*has no bias"),
        ("lora", ["mixer"], r"projection sites and 'layers.0:mixer' is a module site"),
        ("ln_tuning", ["ssm.in"], "ssm.in|Linear|norm"),
        (
            "bottleneck_adapter",
            ["ssm.dt"],
            r"'layers.0:ssm.dt' is a weight the MambaMixer reads in its own arithmetic "
            r"\(dt_proj\): only methods with a merged-weight form apply there",
        ),
    ],
)
def test_refusals_name_the_site_kind(method: str, targets: list[str], message: str) -> None:
    backbone = MAMBA.make()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(TargetError, match=message):
        unipeft.apply(backbone, method, targets=targets)
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _randomise(model: nn.Module, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


def test_lora_on_dt_proj_matches_a_hand_written_low_rank_update() -> None:
    """The mixer reads ``dt_proj.weight`` itself: the adapted model equals the same Mamba
    with ``W + scale * B @ A`` written into that weight, and the backbone's own parameters
    and the order of its state dict are untouched by the forward pass."""
    backbone = MAMBA.make()
    keys = list(backbone.state_dict())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = _lora_matches_hand_update(backbone, 1, "ssm.dt", "dt_proj")
    assert list(backbone.state_dict()) == keys
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())
    assert isinstance(backbone.layers[1].mixer.dt_proj.weight, nn.Parameter)
    model.unload()
    assert "forward" not in vars(backbone.layers[1].mixer)  # the host leaves no trace


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_ssf_on_the_depthwise_convolution_matches_scaled_conv_weights(name: str) -> None:
    bb = BACKBONES[name]
    x = bb.sample(0)
    model = unipeft.apply(bb.make(), "ssf", targets=["ssm.conv[0]"])
    _randomise(model)
    delta = model.adapters["default"].delta_at("layers.0:ssm.conv")
    reference = bb.make()
    with torch.no_grad():
        conv = reference.layers[0].mixer.conv1d
        conv.weight.mul_(delta.scale.view(-1, 1, 1))
        conv.bias.mul_(delta.scale).add_(delta.shift)
        torch.testing.assert_close(bb.run(model, x), bb.run(reference, x))


@pytest.mark.parametrize(
    ("method", "targets", "config"),
    [
        ("lora", ["ssm.dt", "ssm.in"], {"r": 2}),
        ("loha", ["ssm.dt"], {"r": 2}),
        ("ssf", ["ssm.conv"], {}),
        ("bitfit", ["ssm.conv", "ssm.dt"], {}),
    ],
)
def test_deltas_on_read_weights_train_save_and_merge(
    method: str, targets: list[str], config: dict, tmp_path: Path
) -> None:
    x = MAMBA.sample(0)
    model = unipeft.apply(MAMBA.make(), method, targets=targets, **config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=0.05)  # the time step's gradients are small here
    target = torch.randn(
        MAMBA.run(MAMBA.make(), x).shape, generator=torch.Generator().manual_seed(1)
    )
    start = [p.detach().clone() for p in trainable]
    for _ in range(3):
        loss = (MAMBA.run(model, x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(p, s) for p, s in zip(trainable, start))  # every one trained
    with torch.no_grad():
        trained = MAMBA.run(model, x)
        assert not torch.allclose(trained, MAMBA.run(MAMBA.make(), x))
        model.save(tmp_path)
        assert torch.equal(MAMBA.run(unipeft.load(MAMBA.make(), tmp_path), x), trained)
        model.merge()
        torch.testing.assert_close(MAMBA.run(model, x), trained, atol=1e-5, rtol=1e-4)
        model.unmerge()
        assert torch.equal(MAMBA.run(model, x), trained)


def test_a_mixed_batch_runs_each_adapter_on_its_own_samples() -> None:
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(2))
    model = unipeft.apply(MAMBA.make(), "lora", adapter_name="a", r=2, targets=["ssm.dt"])
    model.add_adapter("b", "ssf", targets=["ssm.conv", "ssm.in"])
    _randomise(model)
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).last_hidden_state
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable():
                    alone = model(input_ids=ids[i : i + 1]).last_hidden_state
            else:
                model.set_active(name)
                alone = model(input_ids=ids[i : i + 1]).last_hidden_state
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("lora", {"r": 2}),
        ("dora", {"r": 2}),
        ("loha", {"r": 2}),
        ("lokr", {"r": 2}),
        ("oft", {"oft_block_size": 2}),
        ("fourierft", {"n_frequency": 8}),
        ("vera", {"r": 2}),
        ("ia3", {}),
        ("bitfit", {}),
    ],
)
def test_merged_form_methods_on_dt_proj_keep_the_lifecycle_promises(
    method: str, config: dict
) -> None:
    """Disabled is the base bit for bit, merged equals unmerged, unmerge restores the
    weights exactly, and one backward reaches every trainable parameter."""
    x = MAMBA.sample(0)
    backbone = MAMBA.make()
    base_state = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = unipeft.apply(backbone, method, targets=["ssm.dt"], **config)
    _randomise(model, 0.2)
    with torch.no_grad():
        base = MAMBA.run(MAMBA.make(), x)
        with model.disable():
            assert torch.equal(MAMBA.run(model, x), base)
        adapted = MAMBA.run(model, x)
        assert not torch.equal(adapted, base)
        model.merge()
        torch.testing.assert_close(MAMBA.run(model, x), adapted, atol=1e-5, rtol=1e-4)
        model.unmerge()
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in base_state.items())
    MAMBA.run(model, x).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_prefix_tuning_is_refused_for_want_of_attention(name: str) -> None:
    """Mamba2's config has heads (the SSM's), yet no layer attends: prefix tuning is
    refused by the token site itself, and prompt tuning is what fits there."""
    backbone = BACKBONES[name].make()
    with pytest.raises(TargetError, match=r"without attention layers.*use prompt_tuning"):
        unipeft.apply(backbone, "prefix_tuning", targets=["tokens"])
    assert unipeft.apply(backbone, "prompt_tuning", num_tokens=2).adapters["default"].sites
