"""Reading CvT weights in every supported format, safely: `read_checkpoint` -> `Checkpoint`.

Formats read (all through ``torch.load(weights_only=True)`` or safetensors, so no file can run code):

* official model-zoo files: a plain state dict with the release's keys;
* official training checkpoints: ``{'state_dict': ..., 'optimizer': ..., 'epoch': ..., 'perf': ...}``;
* DataParallel / DDP / torch.compile prefixes (``module.``, ``_orig_mod.``);
* Hugging Face ``CvtForImageClassification`` / ``CvtModel`` weights: ``model.safetensors`` or
  ``pytorch_model.bin``, or a folder holding one with its ``config.json``;
* the project's own ``checkpoint.pth`` (its model's weights, or with ``use_ema`` the EMA's it holds)
  and ``.safetensors`` exports (which carry spec and class names);
* by name: a published tag (``cvt-13``) or ``hf-hub:org/repo[@revision]``, fetched into the Hugging Face
  cache (`cvt.weights.hub`). An existing path of the same name wins.

What a checkpoint says about its activation (`Checkpoint.act`, with `act_reason`): the project's files
store it; the published tags and the hub cache's copies of them ran QuickGELU in the release; any other
hub repo is presumed trained in transformers (GELU); other Hugging Face layout files do not say (None).

What a file says is checked before use: a field of the wrong type or size is one `UserError` naming
the file and the field. The checksum the project writes with a file (a ``.sha256`` beside a torch
file, ``sha256`` metadata in a .safetensors file) is verified on every read.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError, short_list
from ..files import verify_checksum
from ..models.convert import (
    activation_from_hf_config,
    checkpoint_filter_fn,
    class_names_from_hf_config,
    is_hf_state_dict,
    num_labels_from_hf_config,
    spec_from_hf_config,
)
from .hf_preprocessor import PREPROCESSOR_FILE, eval_settings_from_hf_preprocessor
from .hub import HF_HUB_PREFIX, WEIGHT_FILES, download, is_hub_name, provenance

__all__ = ["Checkpoint", "read_checkpoint", "tensor_digest"]


@dataclass
class Checkpoint:
    """Weights read from a file, converted to the model's (official) keys, plus what the file says."""

    # Out of the repr: a REPL or a log line would print every tensor (megabytes for CvT-13).
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    source: str
    format: str  # 'official', 'official-training', 'huggingface', 'cvt', 'cvt-safetensors', 'state-dict'
    spec: dict[str, Any] | None = None
    act: str | None = None  # the MLP activation the weights were trained with, where known
    act_reason: str | None = None  # how that is known, for the log
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # the rest of a training checkpoint
    # The test transform the weights were evaluated with ({config key: value}), where the file says.
    eval_settings: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int | None:
        head = self.state_dict.get("head.weight")
        return None if head is None else head.shape[0]


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _bad_field(source: str, field_name: str, problem: str) -> UserError:
    return UserError(f"checkpoint {source!r}: its {field_name!r} {problem}; use an intact copy or the file it was exported from")


def _checked(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` after checking the fields a file supplies, which a crafted or damaged file can get wrong."""
    source = ckpt.source
    if ckpt.spec is not None and not isinstance(ckpt.spec, Mapping):
        raise _bad_field(source, "spec", f"is a {type(ckpt.spec).__name__}, not a mapping of MODEL.SPEC keys")
    if ckpt.act is not None and not isinstance(ckpt.act, str):
        raise _bad_field(source, "act", f"is a {type(ckpt.act).__name__}, not an activation name")
    names = ckpt.class_names
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad_field(source, "class_names", "is not a list of strings")
        if ckpt.num_classes is not None and len(names) != ckpt.num_classes:
            raise _bad_field(source, "class_names", f"holds {len(names)} names for a head of {ckpt.num_classes} classes")
    if ckpt.eval_settings is not None and not isinstance(ckpt.eval_settings, Mapping):
        raise _bad_field(source, "eval_transform", "is not a mapping of config keys")
    config = ckpt.extra.get("config")
    if config is not None and not isinstance(config, str):
        raise _bad_field(source, "config", f"is a {type(config).__name__}, not the YAML text of a config")
    return ckpt


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    verify_checksum(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    # torch.save writes a zip archive ("PK"); older torch versions a pickle (protocol marker 0x80).
    if magic not in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        if path.suffix.lower() == ".onnx":  # the suffix by which `cvt predict` runs it
            raise UserError(
                f"{str(path)!r} is an ONNX deployment file (`cvt export`), not a checkpoint; give the checkpoint "
                "it was exported from (`cvt predict` runs the .onnx file itself), or run it with onnxruntime"
            )
        raise UserError(
            f"{str(path)!r} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
            "give a .pth/.pt/.bin checkpoint, a .safetensors file or a Hugging Face model folder"
        )
    deployed = _deployment_kind(path) if magic == b"PK" else None
    if deployed is not None:  # torch.load would warn, then fail as if the file were corrupt
        kind, loader = deployed
        raise UserError(
            f"{str(path)!r} is a {kind} deployment file (`cvt export`), not a checkpoint; give the checkpoint "
            f"it was exported from (`cvt predict` also runs its .onnx export), or run it with {loader}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # not plain tensors and containers: refused before anything runs
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt or holds Python objects other than tensors and plain "
            "containers; refused, because loading it could run code (re-save it as a state dict or .safetensors)"
        ) from e
    except Exception as e:  # truncated zip, bad magic number, EOF: the file is damaged
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__  # the first sentence
        raise UserError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({reason[:160]}); use an intact copy"
        ) from e


def _deployment_kind(path: Path) -> tuple[str, str] | None:
    """(format, the function that loads it) of a TorchScript or torch.export archive, told by the
    entries only it holds; else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            # Every entry sits under one folder named by the writer: compare what follows it.
            entries = {name.partition("/")[2] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError):  # damaged: torch.load's own message says how
        return None
    if "constants.pkl" in entries or any(e.startswith("code/") for e in entries):
        return "TorchScript", "torch.jit.load"
    if "archive_format" in entries or any(e.startswith("models/") for e in entries):
        return "torch.export", "torch.export.load"
    return None


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(f"checkpoint {str(path)!r} is truncated or corrupt ({e}); use an intact copy") from e
    return tensors, metadata


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any], *, use_ema: bool = False) -> Checkpoint:
    """Read weights from a file, folder or in-memory dict, in any supported format.

    `use_ema`: the exponential moving average of the weights (TRAIN.EMA.ENABLED) that a training
    checkpoint (`checkpoint.pth`) holds beside the model's, instead of the model's (timm's --use-ema).
    """
    if use_ema:
        if _names_hub_weights(source):
            raise _no_ema(str(source))  # before a download: published and hub weights are a model's
        return _checked(_ema_weights(_read(source)))
    return _read(source)


def _names_hub_weights(source: str | os.PathLike | Mapping[str, Any]) -> bool:
    """Whether ``source`` names published or hub weights (a tag, ``hf-hub:...``), not a path or a dict;
    an existing path of the same name wins."""
    return not isinstance(source, Mapping) and not Path(source).exists() and is_hub_name(str(source))


def _no_ema(name: str) -> UserError:
    return UserError(
        f"checkpoint {name!r} holds no EMA weights: only a run's checkpoint.pth does (trained with "
        "TRAIN.EMA.ENABLED True); give that file, or drop --use-ema / TEST.USE_EMA"
    )


def _ema_weights(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with the EMA weights it holds as its state dict, or a `UserError` saying where they are."""
    name = ckpt.source
    if ckpt.format != "cvt":
        raise _no_ema(name)
    ema = ckpt.extra.get("ema")
    if ema is None:
        raise UserError(
            f"checkpoint {name!r} holds no EMA weights: its run was trained without TRAIN.EMA.ENABLED; "
            "drop --use-ema / TEST.USE_EMA to use its model's weights"
        )
    if not _is_state_dict(ema):
        raise _bad_field(name, "ema", "is not a state dict of tensors")
    ckpt.state_dict = checkpoint_filter_fn(ema)
    ckpt.source = f"{ckpt.source} (EMA weights)"
    return ckpt


def _read(source: str | os.PathLike | Mapping[str, Any]) -> Checkpoint:
    if isinstance(source, Mapping):
        return _checked(_from_object(dict(source), "<state dict>"))
    if _names_hub_weights(source):
        return _read_hub(str(source))
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        text = str(source)
        looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/")) and not path.suffix
        hub_hint = f"{HF_HUB_PREFIX}{text}" if looks_like_repo else f"{HF_HUB_PREFIX}org/name"
        raise UserError(
            f"checkpoint {text!r} does not exist; check the path, or name a published checkpoint "
            f"(`cvt list`) or a hub repo ({hub_hint})"
        )
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {str(path)!r} is empty (0 bytes); use an intact copy")
    if path.suffix == ".safetensors":
        tensors, metadata = _safetensors_load(path)
        if "sha256" in metadata and tensor_digest(tensors) != metadata["sha256"]:
            raise UserError(f"checkpoint {str(path)!r} does not match the checksum in its metadata: the file is corrupt; use an intact copy")
        return _checked(_from_safetensors(tensors, metadata, str(path)))
    return _checked(_from_object(_torch_load(path), str(path)))


def _read_hub(name: str) -> Checkpoint:
    hub = download(name)
    ckpt = _read_folder(hub.folder)
    ckpt.source = name if hub.published and name == hub.published.tag else f"{name} ({hub.folder})"
    return ckpt


def _set_provenance(ckpt: Checkpoint, folder: Path) -> None:
    """Activation (and, for a published tag, the release's test transform) of a hub cache snapshot."""
    found = provenance(folder)
    if found is None:
        return
    repo, published = found
    if published is not None:
        ckpt.act = published.act
        ckpt.act_reason = f"{repo} holds the release's {published.tag} checkpoint, trained with QuickGELU"
        ckpt.eval_settings = published.eval_settings()
    else:
        ckpt.act = "gelu"
        ckpt.act_reason = (
            f"{repo} is not one of the published checkpoints, so it is taken as trained in transformers, "
            "which runs exact GELU (MODEL.ACTIVATION / act= overrides)"
        )


def _read_folder(folder: Path) -> Checkpoint:
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise UserError(f"folder {str(folder)!r} holds none of {', '.join(WEIGHT_FILES)}; point at a weights file or a Hugging Face model folder")
    ckpt = read_checkpoint(weights)
    config_file = folder / "config.json"
    if config_file.is_file():
        config = _read_json(config_file)
        if not isinstance(config, dict):
            raise UserError(f"{str(config_file)!r} holds a JSON {type(config).__name__}, not a Hugging Face config object; use an intact copy")
        if config.get("model_type") == "cvt":
            try:
                ckpt.spec = spec_from_hf_config(config)
                ckpt.class_names = class_names_from_hf_config(config)
                if num_labels_from_hf_config(config) != ckpt.num_classes:
                    ckpt.class_names = None
                recorded_act = activation_from_hf_config(config)
                if recorded_act:
                    ckpt.act = recorded_act
                    ckpt.act_reason = f"recorded in {config_file.name} by the export that wrote it"
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise UserError(f"{str(config_file)!r} does not describe a CvT ({type(e).__name__}: {e}); use an intact copy") from None
            _checked(ckpt)
    preprocessor_file = folder / PREPROCESSOR_FILE
    if preprocessor_file.is_file():
        preprocessor = _read_json(preprocessor_file)
        ckpt.eval_settings = eval_settings_from_hf_preprocessor(preprocessor) or ckpt.eval_settings
    if ckpt.format == "huggingface" and ckpt.act is None:
        _set_provenance(ckpt, folder)
    return ckpt


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{str(path)!r} is not valid JSON ({e})") from None


def _from_safetensors(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> Checkpoint:
    if metadata.get("format") == "cvt":
        return Checkpoint(
            state_dict=checkpoint_filter_fn(tensors),
            source=source,
            format="cvt-safetensors",
            spec=_json_metadata(metadata, "spec", source),
            act=metadata.get("act"),
            act_reason="saved with the weights" if "act" in metadata else None,
            class_names=_json_metadata(metadata, "class_names", source),
            eval_settings=_json_metadata(metadata, "eval_transform", source),
        )
    return _from_object(tensors, source)


def _json_metadata(metadata: Mapping[str, str], key: str, source: str) -> Any:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise UserError(
            f"checkpoint {source!r}: its {key!r} metadata is not valid JSON ({e}); use an intact copy"
        ) from None


def _from_object(obj: Any, source: str) -> Checkpoint:
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint {source!r} holds a {type(obj).__name__}, not a state dict; is it a CvT checkpoint?")
    if "model" in obj and "epoch" in obj and _is_state_dict(obj["model"]):  # the project's checkpoint.pth
        extra = {k: v for k, v in obj.items() if k != "model"}
        return Checkpoint(
            state_dict=checkpoint_filter_fn(obj["model"]),
            source=source,
            format="cvt",
            spec=obj.get("spec"),
            act=obj.get("act"),
            act_reason="saved with the weights" if obj.get("act") else None,
            class_names=obj.get("class_names"),
            extra=extra,
        )
    if "state_dict" in obj and _is_state_dict(obj["state_dict"]):  # the release's training checkpoint
        extra = {k: v for k, v in obj.items() if k != "state_dict"}
        return Checkpoint(checkpoint_filter_fn(obj["state_dict"]), source, "official-training", extra=extra)
    if not _is_state_dict(obj):
        keys = short_list(list(map(str, obj)), 5)
        raise UserError(f"checkpoint {source!r} is not a CvT state dict (top-level keys: {keys}); is it the right file?")
    if is_hf_state_dict(obj):
        return Checkpoint(checkpoint_filter_fn(obj), source, "huggingface")
    return Checkpoint(checkpoint_filter_fn(obj), source, "state-dict")

