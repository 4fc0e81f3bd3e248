"""Export of a classifier to ONNX with a parity check against torch (see the package docstring for the
exporter choice), and this package's errors."""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
BATCH_DIM = "batch"
EXPORTERS = ("dynamo", "legacy")
LEGACY_DEFAULT_OPSET = 17
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB cap, with room for the graph

class OnnxError(ValueError):
    """Base of this module's errors (a ValueError: each one is about a bad model, file or input)."""


class OnnxExportError(OnnxError):
    """The model cannot be exported as a classifier (bad example, output not ``[N,K]``, exporter failure)."""


class OnnxParityError(OnnxExportError):
    """The exported graph's logits differ from torch's by more than ``atol``; ``.report`` holds the figures."""

    def __init__(self, report: "ExportReport"):
        self.report = report
        super().__init__(f"ONNX parity check failed: max abs logit diff {report.max_abs_diff:.3g} > atol "
                         f"{report.atol:g} (file left at {report.path})\n{report}")


class OnnxModelError(OnnxError):
    """The ``.onnx`` file is missing, unreadable, or not a dynamic-batch ``[N,C,H,W] -> [N,K]`` classifier."""


class OnnxInputError(OnnxError):
    """An input tensor that the loaded model cannot take (type, rank, channels, size, dtype)."""


# ----------------------------------------------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What :func:`export_classifier` wrote and how close onnxruntime came to torch."""

    path: str
    exporter: str
    opset: int
    input_shape: tuple            # ONNX input shape, None for a dynamic axis
    batch_sizes_checked: tuple
    max_abs_diff: float           # over all checked batches
    atol: float
    providers: list               # onnxruntime providers of the parity check
    ok: bool
    diffs: dict = field(default_factory=dict)   # batch size -> max abs diff
    max_abs_logit: float = float("nan")         # scale of the torch logits (diffs grow with it)
    export_seconds: float = float("nan")

    def __str__(self) -> str:
        shape = "[" + ", ".join("N" if d is None else str(d) for d in self.input_shape) + "]"
        lines = [
            f"ONNX export {'OK' if self.ok else 'FAILED'}: {self.path}",
            f"  exporter {self.exporter}, opset {self.opset}, input {shape}, export {self.export_seconds:.1f} s",
            f"  parity vs torch fp32 on {', '.join(self.providers)} (atol {self.atol:g}, "
            f"max |logit| {self.max_abs_logit:.3g}):",
        ]
        for n, d in self.diffs.items():
            lines.append(f"    batch {n:>4}: max abs diff {d:.3g}  {'ok' if d <= self.atol else 'FAIL'}")
        lines.append(f"  max abs diff {self.max_abs_diff:.3g} -> {'ok' if self.ok else 'FAIL'}")
        return "\n".join(lines)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no grad on every parameter for the block; restores each module's and parameter's flag."""
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 matmul/conv on CUDA for the torch reference (TF32 alone would miss a 1e-4 parity bound)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _rename_dim(model_proto, old: str, new: str) -> None:
    values = list(model_proto.graph.input) + list(model_proto.graph.output) + list(model_proto.graph.value_info)
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param == old:
                d.dim_param = new


def _export_dynamo(model, example, path: Path, dynamic_batch: bool, opset, external_data: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the exporter's own message
        raise OnnxExportError(f"torch.export could not trace {type(model).__name__} "
                              f"({'dynamic' if dynamic_batch else 'fixed'} batch): {e}\nIf the model bakes in "
                              f"its batch size, fix that or pass dynamic_batch=False; for models torch.export "
                              f"cannot trace, try exporter='legacy'.") from e
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, (example,), str(path), dynamo=True, external_data=external_data,
                          opset_version=opset, input_names=["input"], output_names=["logits"], verbose=False)


def _export_legacy(model, example, path: Path, dynamic_batch: bool, opset, external_data: bool) -> None:
    axes = {"input": {0: BATCH_DIM}, "logits": {0: BATCH_DIM}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=opset or LEGACY_DEFAULT_OPSET,
                          do_constant_folding=True)


def export_classifier(model: nn.Module, example_input: torch.Tensor, path, dynamic_batch: bool = True,
                      opset: int | None = None, *, exporter: str = "dynamo", atol: float = 1e-4,
                      strict: bool = True) -> ExportReport:
    """Exports ``model`` (``[N,C,H,W] -> [N,K]`` logits, fp32) to ``path`` and checks it against torch.

    Args:
        model: the classifier; put in eval mode (and its parameters' ``requires_grad`` off) for the export only:
            every module's training flag and every parameter's ``requires_grad`` are restored afterwards, even
            on error. Its parameters and buffers are not written to.
        example_input: ``[N,C,H,W]`` float32 images (``[C,H,W]`` is taken as N=1). With ``dynamic_batch`` a
            batch of 1 is repeated to 2 for the export, so the exporter cannot specialise the batch axis to 1.
        path: the ``.onnx`` file to write (parent folders are made). Weights sit inside the file unless the
            model is over ~1.8 GB, when the dynamo exporter writes them beside it (``<path>.data``).
        dynamic_batch: a dynamic batch axis named ``batch``; False keeps the example's batch size fixed.
        opset: ONNX opset; None: the exporter's default (20 for dynamo, 17 for legacy, as measured here).
        exporter: ``"dynamo"`` (default; see the module docstring for why) or ``"legacy"`` (TorchScript).
        atol: parity bound on the max abs logit difference, onnxruntime CPU against torch fp32.
        strict: on a parity miss, raise :class:`OnnxParityError` (True) or return the report with
            ``ok=False`` (False).

    Parity is checked on the example batch and, with ``dynamic_batch``, on batches of 1 and N+1 made from the
    example's rows, with onnxruntime's CPU provider (it checks the graph, not a device). A model on CUDA is
    exported where it sits; its torch reference runs with TF32 off.

    Raises:
        OnnxExportError: a bad example or model output, or an exporter failure (message says which).
        OnnxParityError: parity above ``atol`` with ``strict=True``.
    """
    import onnx
    import onnxruntime as ort

    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise OnnxExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not isinstance(example_input, torch.Tensor):
        raise OnnxExportError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    x = example_input.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] < 1 or min(x.shape[1:]) < 1:
        raise OnnxExportError(f"example_input must be [N,C,H,W] (or [C,H,W]) with N >= 1, got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise OnnxExportError(f"example_input must be float32 (the export and its 1e-4 parity check are fp32), "
                              f"got {x.dtype}")
    device = _model_device(model)
    x = x.to(device).contiguous()
    if dynamic_batch and x.shape[0] < 2:
        x = x.repeat(2, 1, 1, 1)
    n0 = x.shape[0]
    sizes = (n0, 1, n0 + 1) if dynamic_batch else (n0,)
    batches = {n: x[torch.arange(n, device=device) % n0] for n in sizes}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    external = param_bytes > _EXTERNAL_DATA_BYTES
    if external and exporter == "legacy":
        raise OnnxExportError(f"model weights are {param_bytes / 1e9:.1f} GB, over the 2 GB a single .onnx file "
                              f"holds; use exporter='dynamo' (writes external data)")

    with _frozen(model), torch.no_grad():
        with _no_tf32():
            refs = {}
            for n, xb in batches.items():
                out = model(xb)
                if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise OnnxExportError(f"model must return logits [N,K]; for input {tuple(xb.shape)} it "
                                          f"returned {got}")
                refs[n] = out.float().cpu().numpy()
        start = time.perf_counter()
        try:
            (_export_dynamo if exporter == "dynamo" else _export_legacy)(model, x, path, dynamic_batch, opset,
                                                                          external)
        except OnnxExportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(f"{exporter} ONNX export of {type(model).__name__} failed: "
                                  f"{type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start

    proto = onnx.load(str(path), load_external_data=False)
    if dynamic_batch and exporter == "dynamo":
        sym = proto.graph.input[0].type.tensor_type.shape.dim[0]
        if sym.HasField("dim_param") and sym.dim_param != BATCH_DIM:
            _rename_dim(proto, sym.dim_param, BATCH_DIM)
            onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))   # by path: handles external data and > 2 GB
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
    in_shape = tuple(d.dim_value if d.HasField("dim_value") else None
                     for d in proto.graph.input[0].type.tensor_type.shape.dim)

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()   # follows the caller's torch thread setting
    session = ort.InferenceSession(str(path), so, providers=[CPU])
    name = session.get_inputs()[0].name
    diffs = {}
    for n, xb in batches.items():
        try:
            got = session.run(None, {name: xb.cpu().numpy()})[0]
        except Exception as e:  # noqa: BLE001 - a graph that cannot take this batch size
            raise OnnxExportError(f"the exported graph {path} failed on onnxruntime at batch {n}: {e}") from e
        if got.shape != refs[n].shape:
            raise OnnxExportError(f"the exported graph {path} returned {got.shape} at batch {n}, torch "
                                  f"{refs[n].shape}: the batch size is baked into the graph")
        diffs[n] = float(np.abs(got.astype(np.float64) - refs[n]).max()) if got.size else 0.0
    worst = max(diffs.values())
    report = ExportReport(path=str(path), exporter=exporter, opset=opset_used, input_shape=in_shape,
                          batch_sizes_checked=tuple(sizes), max_abs_diff=worst, atol=atol,
                          providers=session.get_providers(), ok=bool(worst <= atol), diffs=diffs,
                          max_abs_logit=float(max(np.abs(r).max() for r in refs.values())),
                          export_seconds=seconds)
    if strict and not report.ok:
        raise OnnxParityError(report)
    return report

