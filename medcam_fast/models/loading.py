"""Loading a classifier from a SPEC string, never by unpickling.

SPECs:

- ``demo``: the bundled brain MRI classifier (``medcam_fast.zoo.load_demo()``).
- ``timm:<arch>:<weights.safetensors>[:<num_classes>]``: ``timm.create_model(arch, pretrained=False)``
  with the safetensors state dict loaded strictly. ``num_classes`` and ``in_chans`` default to what the
  weights' classifier and first conv say. Input size/mean/std: the file's safetensors metadata keys
  ``input_size``, ``mean``, ``std`` (JSON, e.g. ``"[1, 128, 128]"``) if present, else timm's data config
  for the arch; explicit options override either. Metadata ``class_names`` (JSON list) names the classes.
- a TorchScript file (``torch.jit.save``): its layers cannot be hooked, so Med-CAM matches its logits
  only (no intermediate activations) and Grad-CAM is left out.
- a ``torch.export`` program (``torch.export.save``, ``.pt2``): loaded with ``torch.export.load`` and
  unflattened (``torch.export.unflatten``) so its module tree, and the activations Med-CAM matches,
  survive (``ExportedProgram.module()`` refuses ``eval()``). Export it with a dynamic batch axis.

Pickled checkpoints (``torch.save`` of a module or a state dict) are refused, never unpickled:
unpickling can run arbitrary code. Files are told apart by their zip entries, not their suffix.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class InputOptions:
    """What a model file cannot say about its inputs: size ``(H, W)``, per-channel mean/std, class names."""

    size: tuple | None = None
    mean: list | None = None
    std: list | None = None
    classes: str | None = None


PICKLE_ADVICE = (
    "medcam-fast does not unpickle model files: unpickling can run arbitrary code. Instead either save the "
    "weights as safetensors (safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) and pass "
    "--model timm:<arch>:model.safetensors[:<num_classes>], or export the model with TorchScript "
    "(torch.jit.save(torch.jit.script(model), 'model.pt')) or torch.export "
    "(torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
    "'model.pt2')) and pass that file.")


@dataclass
class LoadedModel:
    """A classifier ready for :class:`~medcam_fast.Explainer`, its preprocessing and its classes."""

    model: nn.Module
    preprocess: object
    class_names: list
    description: str
    layers: list | None = None          # Med-CAM layers to match (None: the package's default choice)
    notes: list = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    onnx_model: nn.Module | None = None  # what export-onnx hands the exporter (None: ``model``)
    onnx_exporter: str | None = None     # an exporter this format needs (TorchScript: "legacy")


class _LogitsOnly(nn.Module):
    """Wraps a model whose inner layers cannot be hooked (TorchScript, a flat exported graph): its logits
    pass through ``self.logits`` so Med-CAM can match them, and ``train()`` does not recurse into it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.logits = nn.Identity()

    def forward(self, x):
        return self.logits(self.inner(x))

    def train(self, mode: bool = True):
        self.training = mode
        self.logits.train(mode)
        try:
            self.inner.train(mode)
        except NotImplementedError:   # exported GraphModules refuse train()/eval(); they are traced in eval
            pass
        return self


def archive_kind(path: Path) -> str:
    """``"torchscript"``, ``"export"``, ``"pickle"`` or ``"unknown"``, from the file's zip entries.

    Entries sit under one top folder (``<name>/...``). TorchScript (``torch.jit.save``): ``code/...``
    and ``constants.pkl``. torch.export (``torch.export.save``, torch 2.14): ``archive_format`` (holding
    ``pt2``), ``models/model.json``, ``data/weights/...``. ``torch.save`` (module or state dict):
    ``data.pkl`` and neither of those; a legacy non-zip ``torch.save`` file starts with a pickle opcode."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        return "pickle" if head[:1] == b"\x80" else "unknown"   # protocol-2+ pickle (legacy torch.save)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "export"
    if "data.pkl" in tails:
        return "pickle"
    return "unknown"


def _json_meta(meta: dict, key: str):
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"safetensors metadata {key!r} is not JSON: {meta[key]!r}") from exc


def _load_timm(spec: str) -> tuple[nn.Module, dict, list | None]:
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    parts = spec.split(":")
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise ValueError(f"bad timm spec {spec!r}; expected timm:<arch>:<weights.safetensors>[:<num_classes>]")
    arch, num_classes = parts[1], None
    rest = parts[2:]
    if len(rest) > 1 and rest[-1].isdigit():
        num_classes = int(rest.pop())
    path = Path(":".join(rest))
    if not path.is_file():
        raise ValueError(f"no weights file {str(path)!r}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({exc})") from exc
    try:
        probe = timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:
        raise ValueError(f"timm has no model {arch!r} ({exc})") from exc
    pcfg = probe.pretrained_cfg or {}
    first = state.get(f"{pcfg.get('first_conv')}.weight")
    head = state.get(f"{pcfg.get('classifier')}.weight")
    in_chans = int(first.shape[1]) if first is not None and first.dim() == 4 else 3
    if num_classes is None:
        num_classes = int(head.shape[0]) if head is not None else probe.num_classes
    overlay = {k: tuple(v) for k in ("input_size", "mean", "std") if (v := _json_meta(meta, k)) is not None}
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              pretrained_cfg_overlay=overlay or None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {str(path)!r} do not fit timm {arch!r} with num_classes={num_classes}, "
                         f"in_chans={in_chans}: {exc}") from exc
    names = _json_meta(meta, "class_names")
    return model.eval(), {"arch": arch, "weights": str(path), "num_classes": num_classes, "in_chans": in_chans,
                          "metadata": meta}, names


def _preprocess_for(model: nn.Module, args: "InputOptions", has_timm_cfg: bool, channels: int):
    from ..data import Preprocess

    if has_timm_cfg:
        base = Preprocess.from_model(model)
        mean, std, size = list(base.mean), list(base.std), base.input_size
        if len(mean) != channels:  # timm's config lists RGB stats for an in_chans=1 model
            mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    elif args.size is None:
        raise ValueError("this model has no timm data config: give --size (and --mean/--std if it was trained on "
                         "normalised inputs; default mean 0, std 1)")
    else:
        mean, std, size = [0.0] * channels, [1.0] * channels, None
    size = args.size or size
    mean = args.mean or mean
    std = args.std or std
    if len(mean) == 1 and channels > 1:
        mean = mean * channels
    if len(std) == 1 and len(mean) > 1:
        std = std * len(mean)
    if len(mean) != len(std):
        raise ValueError(f"--mean has {len(mean)} values, --std {len(std)}")
    return Preprocess(tuple(size), tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _channels(model: nn.Module, args: "InputOptions") -> int:
    if args.mean and len(args.mean) > 1:
        return len(args.mean)
    for p in model.parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return 3


def load_model(spec: str, args: "InputOptions | None" = None, device: torch.device | str = "cpu") -> LoadedModel:
    """The classifier a SPEC names (see the module docstring), moved to ``device``; raises ValueError."""
    args = args or InputOptions()
    device = torch.device(device)
    if spec == "demo":
        from .. import zoo

        model, pre, names = zoo.load_demo()
        if args.size or args.mean or args.std:
            raise ValueError("--size/--mean/--std do not apply to the demo model (it brings its own)")
        card = zoo.card()
        names = _class_names(getattr(args, "classes", None), names, len(names))
        return LoadedModel(model.to(device), pre, names, f"bundled demo classifier {zoo.DEMO}",
                           spec={"spec": "demo", "model": card.get("model"), "metrics": card.get("metrics"),
                                 "dataset": card.get("dataset", {}).get("name")})
    layers, notes, names, onnx_model, onnx_exporter = None, [], None, None, None
    if spec.startswith("timm:"):
        model, info, names = _load_timm(spec)
        desc, has_cfg = f"timm {info['arch']} ({info['weights']})", True
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--model {spec!r}: not 'demo', not timm:<arch>:<weights.safetensors>, and no such file")
        if path.suffix.lower() == ".safetensors":
            raise ValueError(f"{spec!r} holds weights only; say which architecture: --model timm:<arch>:{spec}")
        if path.suffix.lower() == ".onnx":
            raise ValueError(f"{spec!r} is ONNX: Med-CAM needs gradients through the model, which onnxruntime "
                             "does not give; pass the PyTorch model (timm:..., TorchScript or torch.export)")
        kind = archive_kind(path)
        info = {"file": str(path), "format": kind}
        has_cfg = False
        if kind == "pickle":
            raise ValueError(f"{spec!r} is a pickled PyTorch checkpoint (torch.save of a module or a state dict). "
                             + PICKLE_ADVICE)
        if kind == "torchscript":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load's deprecation notice
                    inner = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - a damaged archive
                raise ValueError(f"cannot load TorchScript file {spec!r}: {type(exc).__name__}: {exc}") from exc
            model, layers, desc = _LogitsOnly(inner), ["logits"], f"TorchScript model {path.name}"
            onnx_model, onnx_exporter = inner, "legacy"   # torch.export (dynamo) cannot take ScriptModules
            notes.append("TorchScript layers cannot be hooked: Med-CAM matched the model's logits only, "
                         "not its intermediate activations")
        elif kind == "export":
            try:
                program = torch.export.load(str(path))
            except Exception as exc:  # noqa: BLE001 - a damaged archive or another torch version's format
                raise ValueError(f"cannot load torch.export file {spec!r}: {type(exc).__name__}: {exc}") from exc
            onnx_model = _LogitsOnly(program.module())    # the flat graph exports; the unflattened one does not
            try:
                model = torch.export.unflatten(program)
            except Exception as exc:  # noqa: BLE001 - fall back to the flat graph, logits only
                model, layers = _LogitsOnly(program.module()), ["logits"]
                notes.append(f"torch.export.unflatten failed ({exc}); Med-CAM matched the logits only")
            desc = f"torch.export program {path.name}"
        else:
            raise ValueError(f"{spec!r} is not a model file medcam-fast reads (TorchScript archive, torch.export "
                             ".pt2 archive); for weights use timm:<arch>:<weights.safetensors>")
    model = model.to(device)
    pre = _preprocess_for(model, args, has_cfg, _channels(model, args))
    k = _probe(model, pre, device, spec)
    names = _class_names(getattr(args, "classes", None), names, k)
    return LoadedModel(model, pre, names, desc, layers, notes, spec={"spec": spec, **info}, onnx_model=onnx_model,
                       onnx_exporter=onnx_exporter)


def _probe(model, pre, device, spec) -> int:
    """One forward at batch 1 and 2 (eval mode, restored after): a clear error now instead of a deep one
    mid-run. Returns K."""
    from .freeze import frozen

    out = None
    for n in (1, 2):
        x = torch.zeros(n, pre.in_chans, *pre.input_size, device=device)
        try:
            with frozen(model), torch.no_grad():
                out = model(x)
        except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot be used as given
            raise ValueError(f"{spec!r} cannot take input {tuple(x.shape)} ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); check --size, the "
                             f"channel count (--mean with one value per channel) and that an exported model has a "
                             f"dynamic batch axis") from exc
        if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != n or out.shape[1] < 2:
            raise ValueError(f"{spec!r} must return logits [N,K] with K >= 2; for input {tuple(x.shape)} it "
                             f"returned {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    return int(out.shape[1])


def _class_names(given: str | None, found, k: int) -> list:
    names = [c.strip() for c in given.split(",")] if given else (list(found) if found else None)
    if names is None:
        return [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names {names} for a model with {k} outputs")
    return names
