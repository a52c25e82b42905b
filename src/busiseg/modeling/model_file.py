"""Model files: everything predict needs in one file, loaded without executing code.

A model file holds only tensors and plain values (no pickled classes), is read with
`torch.load(weights_only=True)`, and carries a digest of its weights: a file that is not a busiseg
model, or whose weights were edited, is refused with a clear message.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch

from busiseg.errors import BusisegError, first_line
from busiseg.files import atomic_torch_save, file_sha256
from busiseg.modeling.archs import Blend, FoldEnsemble
from busiseg.modeling.pretrained import input_normalisation
from busiseg.modeling.registry import arch_settings, build_model
from busiseg.params import ModelParams, Params
from busiseg.runtime.device import pin_kernels

FORMAT = "busiseg-model"
VERSION = 1
# 2: a packaged model whose settings carry the expected-Dice curve
# (MaskSettings.presence_expected_dice), written only then, so that an older reader refuses a
# gate it would silently drop
VERSION_EXPECTED = 2
READS = (VERSION, VERSION_EXPECTED)


def model_kwargs(m: ModelParams, presence: bool = False, channels: int = 1) -> dict:
    """The model section minus what this arch does not take (e.g. `compact` has no depth), the
    presence head when training asks for one (train.presence_weight > 0), and the input
    channels (preprocess.channels) where they are not 1."""
    accepted = arch_settings(m.arch)  # an unknown arch fails here with a one-line error
    fields = {k: v for k, v in asdict(m).items() if k in accepted
              and not (k == "decoder_channels" and not v)}  # [] = the decoder's own widths
    return {"arch": m.arch, **fields, **({"presence": True} if presence else {}),
            **({"in_channels": channels} if channels != 1 else {})}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def split_identity(p: Params, split_path: Path) -> dict:
    """The split a model was trained on: its seed, its folds and the digest of split.csv, so
    models composed into one (a blend) can be refused when their folds are not the same."""
    return {"seed": p.split.seed, "folds": p.split.folds, "sha256": file_sha256(split_path)}


def save_model(path: Path, state: dict, kwargs: dict, p: Params, size: int,
               members: int = 0, encoder_weights: dict | None = None,
               split: dict | None = None, seeds: int = 1) -> None:
    """Weights plus what inference needs to feed them (size, normalisation). The threshold and
    post-processing are evaluate's choice, so train's file has none: the package stage writes
    them into a copy (`package_model`), and an evaluate setting changes without re-training.
    With `members`, `state` is a FoldEnsemble's: K fold models of one architecture, each with
    `seeds` > 1 a FoldEnsemble of that many seeds. `split`:
    `split_identity` of the split it trained on (empty in files written without one)."""
    mean, std = input_normalisation(p.model, p.preprocess.channels)
    atomic_torch_save({
        "format": FORMAT,
        "version": VERSION,
        "model": dict(kwargs),
        "members": members,
        **({"seeds": seeds} if seeds > 1 else {}),
        "state_dict": state,
        "digest": weights_digest(state),
        "preprocess": {"size": size, "input_mean": mean, "input_std": std,
                       "channels": p.preprocess.channels},
        "encoder_weights": dict(encoder_weights or {}),
        "params": {k: asdict(getattr(p, k)) for k in ("preprocess", "model", "train", "augment")},
        "split": dict(split or {}),
    }, Path(path))


def model_file_path(path: str | Path) -> Path:
    """The model file a path names: itself, or in a packaged model's folder (what `dvc artifacts
    get busiseg-model` writes) the model.pt inside it."""
    path = Path(path)
    return path / PACKAGED_NAME if path.is_dir() and (path / PACKAGED_NAME).is_file() else path


def read_model_file(path: str | Path) -> dict:
    """The checked contents of a busiseg model file, without building the model; anything that
    is not one, or whose weights do not match their digest, is refused."""
    path = model_file_path(path)
    if not path.is_file():
        raise BusisegError(f"{path}: model file not found; train one with `dvc repro`, or fetch "
                           "the trained one with `dvc pull train`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is not a safe busiseg model
        reason = first_line(exc)
        raise BusisegError(f"{path}: refused: not a busiseg model file, or it holds code/objects "
                           f"that are not loaded for safety ({reason})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise BusisegError(f"{path}: refused: not a busiseg model file")
    if blob.get("version") not in READS:
        raise BusisegError(f"{path}: model file version {blob.get('version')} is not supported "
                           f"by this busiseg (reads {', '.join(map(str, READS))}); retrain or "
                           "upgrade")
    state = blob.get("state_dict")
    if not isinstance(state, dict) or weights_digest(state) != blob.get("digest"):
        raise BusisegError(f"{path}: refused: the weights do not match the file's digest "
                           "(corrupted or tampered with); retrain or restore the file")
    return blob


def recorded_cpu_isa(blob: dict) -> str:
    """The kernels a model file's weights were trained with (train.cpu_isa)."""
    return blob.get("params", {}).get("train", {}).get("cpu_isa", "native")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               cpu_isa: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model (a FoldEnsemble for a cross-validation run) from a busiseg model file
    (or a packaged model's folder); refuse anything else. `cpu_isa` replaces the file's own
    kernel pin (a blend of parts pinned differently computes with one set)."""
    return model_from_file(read_model_file(path), path, device, cpu_isa)


def model_from_file(blob: dict, path: str | Path, device: str | torch.device = "cpu",
                    cpu_isa: str | None = None) -> tuple[torch.nn.Module, dict]:
    """`load_model` for a file already read (`read_model_file`)."""
    # the kernels it was trained with (train.cpu_isa): evaluate and predict then compute exactly
    # what the record did, before their first convolution
    pin_kernels(cpu_isa or recorded_cpu_isa(blob), source="--cpu-isa" if cpu_isa else
                f"{path}'s recorded train.cpu_isa")
    members = blob.get("members", 0)
    try:
        seeds = blob.get("seeds", 1)
        if members and seeds > 1:
            model = FoldEnsemble([FoldEnsemble([build_from_config(blob["model"])
                                                for _ in range(seeds)]) for _ in range(members)])
        elif members:
            model = FoldEnsemble([build_from_config(blob["model"]) for _ in range(members)])
        else:
            model = build_from_config(blob["model"])
        model.load_state_dict(blob["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise BusisegError(f"{path}: refused: weights do not fit model {blob['model']} "
                           f"({first_line(exc)})") from None
    return model.to(device).eval(), blob


def build_from_config(config: dict) -> torch.nn.Module:
    """An untrained model of a file's `model` config. A Blend (`busiseg.research.blend`) is no
    registry arch, which params.yaml could then name for training; its parts are."""
    if config.get("arch") == "blend":
        return Blend([build_model(**c) for c in config["parts"]], config["masks_from"],
                     config["presence_from"])
    return build_model(**config)


PACKAGED_NAME = "model.pt"  # the file in a packaged model's folder (the busiseg-model artifact)


def package_model(src: str | Path, dst: str | Path, settings: dict, sources: dict,
                  classifier: dict | None = None) -> dict:
    """The trained model with the settings evaluate chose (MaskSettings.as_dict()) and where each
    came from: one file that predicts the masks evaluate scored with no workspace around it.
    The weights and their digest are the trained file's, unchanged. `classifier`: the classify
    stage's file, carried whole, since evaluate's gate was chosen on its p_lesion."""
    blob = read_model_file(src)
    blob["settings"] = dict(settings)
    blob["settings_source"] = dict(sources)
    if classifier is not None:
        blob["classifier"] = classifier
    gated = settings.get("presence_expected_dice") is not None
    blob["version"] = VERSION_EXPECTED if gated else VERSION
    atomic_torch_save(blob, Path(dst))
    return blob
