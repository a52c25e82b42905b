"""A trained model as one ONNX file, for viewers and hospital systems that do not run Python.

The file carries, beside the weights, everything predict needs to give the same masks on another
machine: the input size and normalisation, and the threshold and post-processing that evaluate
chose. A packaged model with an image classifier (classify.kind) exports both in one graph on
the one input: the classifier's output is its members' mean logits, which predict reads as one
member, so its p_lesion and p_malignant are the .pt model's. Export checks ONNX Runtime against
PyTorch before it writes anything.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from busiseg.errors import BusisegError, first_line
from busiseg.inference.segment import MaskSettings, Stats, as_stats
from busiseg.modeling.archs import split_output
from busiseg.modeling.classifier import build_members
from busiseg.modeling.registry import is_smp

OPSET = 18  # the opset the parity tests verify
FORMAT = "busiseg-onnx"
# 2: "presence" from every fold ensemble; confidence, flag, channels. 3: the expected-Dice curve,
# written only by exports that carry one, so that an older reader refuses what it cannot apply
VERSION = 2
VERSION_EXPECTED = 3
VERSION_CLASSIFIER = 4  # 4: an image classifier's output beside the masks, written only then
READS = (1, 2, 3, 4)  # the versions this code loads
CLASSIFIER_OUTPUT = "classifier"  # N×2 logits: lesion, malignant
METADATA_KEY = "busiseg"
TOLERANCE = 1e-4  # largest probability difference ONNX Runtime may show against PyTorch


class WithClassifier(torch.nn.Module):
    """The mask model and the classifier's members as one graph on the mask model's input: the
    classifier's own normalisation is restored inside (x·std_m + mean_m − mean_c) / std_c."""

    def __init__(self, model: torch.nn.Module, members: list[torch.nn.Module],
                 mask_stats: tuple[Stats, Stats], classifier_stats: tuple[Stats, Stats],
                 channels: int) -> None:
        super().__init__()
        self.model, self.members = model, torch.nn.ModuleList(members)

        def per_channel(v: Stats) -> torch.Tensor:
            return torch.tensor(v if isinstance(v, list) else [v] * channels).view(1, -1, 1, 1)

        (mean_m, std_m), (mean_c, std_c) = ([per_channel(v) for v in pair]
                                            for pair in (mask_stats, classifier_stats))
        self.register_buffer("scale", std_m / std_c)
        self.register_buffer("shift", (mean_m - mean_c) / std_c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        masks, presence = split_output(self.model(x))
        xc = x * self.scale + self.shift
        logits = torch.stack([m(xc) for m in self.members]).mean(dim=0)
        return tuple(t for t in (masks, presence, logits) if t is not None)


def export_onnx(model: torch.nn.Module, blob: dict, settings: MaskSettings, out: Path,
                sources: dict | None = None) -> dict:
    """Write `out` (dynamic batch, height and width) and return its metadata; `sources`: where
    each setting came from (a packaged model's `settings_source`), carried on for predict's
    record."""
    pre = blob["preprocess"]
    size = int(pre["size"])
    model = model.cpu().eval()
    batch, height, width = (torch.export.Dim(n) for n in ("batch", "height", "width"))
    # timm's TensorFlow-style "same" padding makes a symbolic height/width export run for many
    # minutes; predict always feeds the training size, so smp models (and the classifier, an
    # smp encoder) export at that size only
    archs = [c["arch"] for c in blob["model"].get("parts", [blob["model"]])]  # a Blend's parts
    classifier = blob.get("classifier")
    spatial = {} if classifier or any(is_smp(a) for a in archs) else {2: height, 3: width}
    channels = int(pre.get("channels", 1))
    probe = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        has_presence = split_output(model(probe))[1] is not None
    outputs = ["logits", "presence"] if has_presence else ["logits"]
    if classifier:
        model = WithClassifier(model, build_members(classifier),
                               (as_stats(pre["input_mean"]), as_stats(pre["input_std"])),
                               (as_stats(classifier["input_mean"]),
                                as_stats(classifier["input_std"])), channels).eval()
        outputs.append(CLASSIFIER_OUTPUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step
            torch.onnx.export(model, (probe,), str(out), input_names=["image"],
                              output_names=outputs, opset_version=OPSET, dynamo=True,
                              external_data=False,
                              dynamic_shapes={"x": {0: batch, **spatial}})
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; report one line
        raise BusisegError(f"{out}: ONNX export failed ({type(exc).__name__}: "
                           f"{first_line(exc, 200)})") from None
    version = VERSION if settings.presence_expected_dice is None else VERSION_EXPECTED
    meta = {"format": FORMAT, "version": VERSION_CLASSIFIER if classifier else version,
            "opset": OPSET, "size": size,
            "input_mean": pre["input_mean"], "input_std": pre["input_std"], "channels": channels,
            **settings.as_dict(), "model": blob["model"], "weights_digest": blob["digest"],
            "any_size": bool(spatial), "outputs": outputs,
            **({"settings_source": dict(sources)} if sources else {}),
            **({"classifier": classifier_meta(classifier)} if classifier else {})}
    import onnx

    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    onnx.save(proto, str(out))
    _check_parity(model, out, probe, any_size=bool(spatial))
    return meta


def classifier_meta(classifier: dict) -> dict:
    """What predict needs to read the classifier output: what it was trained for, and the
    malignancy cut evaluate chose (the card's)."""
    return {"kind": classifier.get("kind"), "malignancy": bool(classifier.get("malignancy")),
            "members": len(classifier["members"]), "output": CLASSIFIER_OUTPUT,
            "malignant_threshold": classifier.get("malignant_threshold"),
            "malignant_temperature": classifier.get("malignant_temperature")}


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, tuple) and len(out) == 3:  # WithClassifier's
        return list(out)
    return [t for t in split_output(out) if t is not None]


def _check_parity(model: torch.nn.Module, path: Path, probe: torch.Tensor,
                  any_size: bool = True) -> None:
    """ONNX Runtime's probabilities against PyTorch's (every output), at the training size and
    at another."""
    forward, _ = load_onnx(path)
    step = int(getattr(model, "size_divisor", 1))
    size = probe.shape[-1]
    other = max(step, size // 2 // step * step)
    other = other if other != size else size + step
    probes = [probe]
    if any_size:
        probes.append(torch.nn.functional.interpolate(probe, size=(other, other))[:1])
    for x in probes:
        with torch.inference_mode():
            want = [torch.sigmoid(t) for t in _outputs(model(x))]
        got = [torch.sigmoid(t) for t in forward.every_output(x)]
        if len(got) != len(want):
            path.unlink(missing_ok=True)
            raise BusisegError(f"{path}: ONNX Runtime gives {len(got)} outputs, PyTorch "
                               f"{len(want)}; file removed")
        diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
        if diff > TOLERANCE:
            path.unlink(missing_ok=True)
            raise BusisegError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} "
                               f"(> {TOLERANCE}); file removed")


class OnnxForward:
    """An ONNX Runtime session behind the call a PyTorch model offers: tensor in, logits out
    (and presence logits, as a tuple, for a model with a presence head). The classifier's
    output, where there is one, is read apart (`classifier_member`)."""

    def __init__(self, session) -> None:
        self.session = session
        self.names = [o.name for o in session.get_outputs()]
        self.outputs = [n for n in self.names if n != CLASSIFIER_OUTPUT]

    def _run(self, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
        x = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return [torch.from_numpy(a) for a in self.session.run(names, {"image": x})]

    def __call__(self, x: torch.Tensor):
        out = self._run(self.outputs, x)
        return out[0] if len(out) == 1 else tuple(out)

    def every_output(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._run(self.names, x)

    def classifier_member(self) -> torch.nn.Module:
        """The classifier output as one member of busiseg.inference.classify.Classifier: the
        members' mean logit is linear, so averaging it with the flipped image's gives exactly
        the .pt classifier's flip-averaged mean."""
        run = self._run

        class Member(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return run([CLASSIFIER_OUTPUT], x)[0]

        return Member()


def load_onnx(path: str | Path, threads: int = 0) -> tuple[OnnxForward, dict]:
    """Open an exported busiseg ONNX file; refuse one without busiseg's metadata."""
    path = Path(path)
    if not path.is_file():
        raise BusisegError(f"{path}: ONNX file not found; make one with busiseg export")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is not a usable ONNX file
        raise BusisegError(f"{path}: not a readable ONNX model "
                           f"({first_line(exc)})") from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        meta = json.loads(raw)
        if meta["format"] != FORMAT or meta["version"] not in READS:
            raise ValueError(f"format {meta['format']} version {meta['version']}")
        MaskSettings.from_dict(meta).checked(str(path))
        int(meta["size"]), int(meta.get("channels", 1))
        as_stats(meta["input_mean"]), as_stats(meta["input_std"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BusisegError(f"{path}: not a busiseg ONNX export (metadata: {exc}); export it "
                           "with busiseg export") from None
    return OnnxForward(session), meta
