"""A trained model as one ONNX file, for viewers and hospital systems that do not run Python.

The file carries, beside the weights, everything predict needs to give the same masks on another
machine: the input size and normalisation, and the threshold and post-processing that evaluate
chose. Export checks ONNX Runtime against PyTorch before it writes anything.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from busiseg.errors import BusisegError, first_line
from busiseg.inference.segment import MaskSettings, as_stats
from busiseg.modeling.archs import split_output
from busiseg.modeling.registry import is_smp

OPSET = 18  # the opset the parity tests verify
FORMAT = "busiseg-onnx"
# 2: "presence" from every fold ensemble; confidence, flag, channels. 3: the expected-Dice curve,
# written only by exports that carry one, so that an older reader refuses what it cannot apply
VERSION = 2
VERSION_EXPECTED = 3
READS = (1, 2, 3)  # the versions this code loads
METADATA_KEY = "busiseg"
TOLERANCE = 1e-4  # largest probability difference ONNX Runtime may show against PyTorch


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
    # minutes; predict always feeds the training size, so smp models export at that size only
    archs = [c["arch"] for c in blob["model"].get("parts", [blob["model"]])]  # a Blend's parts
    spatial = {} if any(is_smp(a) for a in archs) else {2: height, 3: width}
    channels = int(pre.get("channels", 1))
    probe = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        has_presence = split_output(model(probe))[1] is not None
    outputs = ["logits", "presence"] if has_presence else ["logits"]
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
    meta = {"format": FORMAT, "version": version, "opset": OPSET, "size": size,
            "input_mean": pre["input_mean"], "input_std": pre["input_std"], "channels": channels,
            **settings.as_dict(), "model": blob["model"], "weights_digest": blob["digest"],
            "any_size": bool(spatial), "outputs": outputs,
            **({"settings_source": dict(sources)} if sources else {})}
    import onnx

    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    onnx.save(proto, str(out))
    _check_parity(model, out, probe, any_size=bool(spatial))
    return meta


def _check_parity(model: torch.nn.Module, path: Path, probe: torch.Tensor,
                  any_size: bool = True) -> None:
    """ONNX Runtime's probabilities against PyTorch's, at the training size and at another."""
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
            want = [torch.sigmoid(t) for t in split_output(model(x)) if t is not None]
        got = [torch.sigmoid(t) for t in split_output(forward(x)) if t is not None]
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
    (and presence logits, as a tuple, for a model with a presence head)."""

    def __init__(self, session) -> None:
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, x: torch.Tensor):
        x = np.ascontiguousarray(x.detach().cpu().float().numpy())
        out = [torch.from_numpy(a) for a in self.session.run(self.outputs, {"image": x})]
        return out[0] if len(out) == 1 else tuple(out)


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
