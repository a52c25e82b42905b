"""Shape, rebuild, error and gradient checks for every registered arch (tiny widths, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from busiseg.errors import BusisegError
from busiseg.modeling.archs import check_input_size
from busiseg.modeling.registry import ARCHS, build_model, list_archs

UNETS = ["unet", "attention_unet", "res_unet", "unet_plus_plus"]
ZOO = sorted(a for a in ARCHS if not a.startswith("smp_"))  # smp archs: test_pretrained.py


def tiny(arch: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, **{"base": 2 if arch == "compact" else 4, **kw})


def single(out: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    assert isinstance(out, torch.Tensor)
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_all_archs() -> None:
    assert sorted(UNETS + ["compact"]) == ZOO
    assert set(ARCHS) == set(list_archs())


@pytest.mark.parametrize("arch", UNETS)
@pytest.mark.parametrize(("h", "w", "depth"), [(32, 32, 2), (64, 48, 3), (32, 48, 4)])
@pytest.mark.parametrize("up", ["transpose", "bilinear"])
def test_unet_family_shapes(arch: str, h: int, w: int, depth: int, up: str) -> None:
    model = tiny(arch, depth=depth, up=up, in_channels=3, out_channels=2).eval()
    assert model.size_divisor == 2**depth
    with torch.no_grad():
        y = single(model(torch.randn(2, 3, h, w)))
    assert y.shape == (2, 2, h, w)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("up", ["transpose", "bilinear"])
def test_unet_all_norms(norm: str, up: str) -> None:
    model = build_model("unet", base=3, depth=2, norm=norm, up=up, dropout=0.1)  # odd widths
    model.train()
    y = single(model(torch.randn(2, 1, 32, 48)))
    assert y.shape == (2, 1, 32, 48)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (64, 40)])
def test_compact_shapes(h: int, w: int) -> None:
    model = tiny("compact", in_channels=3, out_channels=2).eval()
    assert model.size_divisor == 8
    with torch.no_grad():
        assert single(model(torch.randn(1, 3, h, w))).shape == (1, 2, h, w)


@pytest.mark.parametrize("depth", [2, 3])
def test_unet_plus_plus_deep_supervision(depth: int) -> None:
    # norm "none" makes train and eval compute the same function, so outputs can be compared.
    model = tiny("unet_plus_plus", depth=depth, norm="none", deep_supervision=True, out_channels=2)
    assert model.deep_supervision is True
    x = torch.randn(2, 1, 32, 32)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == depth
    assert all(o.shape == (2, 2, 32, 32) for o in outs)
    with torch.no_grad():
        final = model.eval()(x)
    assert isinstance(final, torch.Tensor) and final.shape == (2, 2, 32, 32)
    assert torch.allclose(final, outs[0], atol=1e-6)  # the final node comes first
    assert not torch.allclose(final, outs[-1])


def test_deep_supervision_off_is_single_tensor_in_training() -> None:
    model = tiny("unet_plus_plus", depth=2).train()
    assert isinstance(model(torch.randn(2, 1, 32, 32)), torch.Tensor)
    for arch in ["unet", "attention_unet", "res_unet", "compact"]:
        assert tiny(arch).deep_supervision is False


@pytest.mark.parametrize("arch", ZOO)
def test_config_rebuilds_identical_architecture(arch: str) -> None:
    kw = {"dropout": 0} if arch == "compact" else {"depth": 3, "norm": "group", "dropout": 0}
    if arch == "unet_plus_plus":
        kw["deep_supervision"] = True
    model = tiny(arch, in_channels=3, **kw)
    config = json.loads(json.dumps(model.config))  # plain JSON types only
    assert config == model.config
    assert config["arch"] == arch and config["in_channels"] == 3
    assert isinstance(config["dropout"], float)
    rebuilt = build_model(**config)
    assert rebuilt.config == model.config
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert type(rebuilt) is type(model)


def test_same_seed_same_weights() -> None:
    a, b = tiny("attention_unet", depth=2), tiny("attention_unet", depth=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("arch", ZOO)
def test_backward_reaches_first_conv(arch: str) -> None:
    kw = {} if arch == "compact" else {"depth": 2}
    if arch == "unet_plus_plus":
        kw["deep_supervision"] = True
    model = tiny(arch, **kw).train()
    out = model(torch.randn(2, 1, 32, 32))
    loss = sum(o.mean() for o in out) if isinstance(out, list) else out.mean()
    loss.backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None
    assert first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ZOO)
def test_params_grow_with_base(arch: str) -> None:
    kw = {} if arch == "compact" else {"depth": 2}
    counts = [n_params(build_model(arch, base=b, **kw)) for b in (2, 4, 8)]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize("arch", ZOO)
def test_channels_last_and_bf16_autocast(arch: str) -> None:
    kw = {} if arch == "compact" else {"depth": 2, "up": "bilinear"}
    model = tiny(arch, **kw).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = single(model(x))
        model = model.to(memory_format=torch.channels_last)
        cl = single(model(x.to(memory_format=torch.channels_last)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = single(model(x.to(memory_format=torch.channels_last)))
    assert torch.allclose(ref, cl, atol=1e-4)
    assert bf.shape == ref.shape and torch.isfinite(bf).all()


# ---- errors -------------------------------------------------------------------------------


def test_unknown_arch() -> None:
    with pytest.raises(BusisegError, match=r"model\.arch 'unte' is unknown; choose one of: .*unet"):
        build_model("unte")


@pytest.mark.parametrize(
    ("arch", "kw", "pattern"),
    [
        ("unet", {"norm": "foo"}, r"model\.norm 'foo'.*batch, instance, group, none"),
        ("unet", {"up": "nearest"}, r"model\.up 'nearest'.*transpose, bilinear"),
        ("unet", {"depth": 0}, r"model\.depth must be an integer from 1 to 6"),
        ("unet", {"depth": 7}, r"model\.depth"),
        ("res_unet", {"base": 0}, r"model\.base must be an integer >= 1"),
        ("unet", {"base": 16.0}, r"model\.base"),
        ("attention_unet", {"dropout": 1.0}, r"model\.dropout must be a number in \[0, 1\)"),
        ("unet", {"dropout": -0.1}, r"model\.dropout"),
        ("unet", {"depth": True}, r"model\.depth"),
        ("unet_plus_plus", {"deep_supervision": "yes"}, r"model\.deep_supervision"),
        ("unet", {"in_channels": 0}, r"model\.in_channels"),
        ("compact", {"dropout": 2}, r"model\.dropout"),
        ("unet", {"deep_supervision": True}, r"model\.deep_supervision is not a parameter"),
        ("compact", {"depth": 3}, r"model\.depth is not a parameter.*'compact'.*base, dropout$"),
        ("compact", {"norm": "batch", "up": "x"}, r"model\.norm, model\.up are not parameters"),
    ],
)
def test_bad_kwargs(arch: str, kw: dict[str, object], pattern: str) -> None:
    with pytest.raises(BusisegError, match=pattern) as info:
        build_model(arch, **kw)
    assert "\n" not in str(info.value)


def test_bad_input_size() -> None:
    model = build_model("unet", base=2, depth=3)
    check_input_size(model, 64, 40)
    msg = (
        r"input size 64x36 is not divisible by 8 \(2\*\*model\.depth\); "
        r"choose preprocess\.size as a multiple of 8 or lower model\.depth"
    )
    with pytest.raises(BusisegError, match=msg):
        check_input_size(model, 64, 36)
    with pytest.raises(BusisegError, match="not divisible by 8"):
        model(torch.randn(1, 1, 36, 64))
    with pytest.raises(BusisegError, match=r"not divisible by 8 .*compact"):
        check_input_size(build_model("compact", base=2), 30, 32)
