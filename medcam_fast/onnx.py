"""ONNX export of a classifier and an onnxruntime forward for the frozen, gradient-free passes.

    from medcam_fast.onnx import export_classifier, OrtClassifier
    report = export_classifier(model, x[:2], "clf.onnx")   # raises OnnxParityError if ORT != torch
    print(report)
    clf = OrtClassifier("clf.onnx")                        # one InferenceSession for the object's life
    logits = clf(x)                                        # torch in, torch out, same device

**Exporter.** :func:`export_classifier` uses the dynamo exporter (``torch.export`` then
``torch.onnx.export(ExportedProgram, dynamo=True)``, which needs onnxscript). Measured here (torch 2.14.1,
onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.31.1, timm 1.0.31, CPU, 1 thread, 64 px, ``pretrained=False``,
export at batch 2, ORT run at batch 1, 2 and 5):

- both exporters exported resnet18, mobilenetv2_100, efficientnet_b0, convnext_atto, vit_tiny_patch16_224
  (img_size=64) and regnetx_002 with a dynamic batch axis, passed ``onnx.checker`` and matched torch (max abs
  logit diff <= 7e-5 for mobilenetv2_100, whose untrained logits reach ~40; <= 1e-6 for the others);
- the legacy TorchScript exporter is 5-20x faster to export (0.4-0.9 s against 3.5-15 s) but emits a
  deprecation warning ("the feature will be removed") in torch >= 2.9, where dynamo became the default;
- on models that bake the batch size in (``x.reshape(2, ...)``, ``for i in range(x.shape[0])``) the legacy
  exporter still declares the input batch dynamic and writes a graph that fails or returns a fixed batch at run
  time; ``torch.export.export`` with a ``Dim("batch")`` refuses them at export with "You marked batch as dynamic
  but your code specialized it to be a constant (2)". (``torch.onnx.export(module, dynamo=True,
  dynamic_shapes=...)`` on its own silently specialised the batch in that case, which is why this module calls
  ``torch.export.export`` itself and hands the ExportedProgram to the ONNX exporter.)

So dynamo is the default, for its support horizon and the export-time batch check; ``exporter="legacy"`` is
kept as a fallback for models ``torch.export`` cannot trace. Whatever the exporter, the parity check below runs
the saved file in onnxruntime at a second and third batch size, so a batch baked in by either is caught.

**Parity failure.** By default (``strict=True``) a parity miss raises :class:`OnnxParityError` carrying the
report (the file is left on disk for inspection); ``strict=False`` returns the report with ``ok=False``.
"""
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

__all__ = ["ExportReport", "OnnxError", "OnnxExportError", "OnnxParityError", "OnnxModelError", "OnnxInputError",
           "export_classifier", "OrtClassifier", "resolve_providers"]

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


# ------------------------------------------------------------------------------------------------------- inference
def resolve_providers(providers="auto") -> list:
    """``"auto"``: CUDA when torch sees a GPU and onnxruntime has the CUDA provider, else CPU. ``"cpu"``/``"cuda"``
    or an explicit onnxruntime provider list (passed through) are taken too."""
    import onnxruntime as ort

    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            cuda = torch.cuda.is_available() and CUDA in ort.get_available_providers()
            return [CUDA, CPU] if cuda else [CPU]
        if key == "cpu":
            return [CPU]
        if key == "cuda":
            return [CUDA, CPU]
        return [providers]
    return list(providers)


def _dim(d):
    return d if isinstance(d, int) and d >= 0 else None


class OrtClassifier:
    """An onnxruntime forward ``[N,C,H,W] float32 -> [N,K]`` logits that takes and returns torch tensors.

    One ``InferenceSession`` lives as long as the object. Calls are thread-safe: ``InferenceSession.run`` is, and
    the CUDA path makes a fresh IO binding per call. Output is on the input's device, never requires grad.

    - CUDA in use (``providers`` lists CUDA first) and a CUDA input: IO binding of the torch tensors' memory
      (no host round trip; torch's current stream is synchronised first). A CPU input then runs through ORT's
      own copies and comes back on CPU.
    - CPU: ``session.run`` on a zero-copy numpy view (IO binding on CPU measured the same, 0.65 ms either way
      at batch 8 of a small net), so the plain path is kept.

    Decisions (each raises :class:`OnnxModelError` at load, or :class:`OnnxInputError` at call):

    - a missing or unreadable ``.onnx`` file: error naming the file;
    - a graph with other than one input, an input not rank 4, or a first output not rank 2: refused;
    - a fixed batch axis in the input or the output (e.g. exported with ``dynamic_batch=False``): refused,
      since this class promises any batch size; re-export with ``dynamic_batch=True``;
    - input dtype other than the graph's (float32 for :func:`export_classifier`'s files), float64 included:
      error, no silent cast (torch's own forward refuses a float64 input to a float32 model too);
    - wrong rank, channels or fixed spatial size: error naming expected and got;
    - N = 0: returns an empty ``[0,K]`` tensor without running the session, as torch would (K from the graph;
      if the graph leaves K symbolic the session is run and its answer returned).
    - ``[C,H,W]`` is not taken as a batch of one: give ``x[None]``.

    Args:
        path: the ``.onnx`` file.
        providers: ``"auto"`` (CUDA if torch sees a GPU and ORT has CUDA, else CPU), ``"cpu"``, ``"cuda"``, or an
            onnxruntime provider list. :attr:`providers` reports what the session actually got.
        intra_op_threads: ORT intra-op threads (None: ORT's default, all cores).
    """

    def __init__(self, path, providers="auto", intra_op_threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"ONNX file not found: {self.path}")
        requested = resolve_providers(providers)
        so = ort.SessionOptions()
        if intra_op_threads is not None:
            if int(intra_op_threads) < 0:
                raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
            so.intra_op_num_threads = int(intra_op_threads)
        provider_opts = [(p, {"device_id": torch.cuda.current_device()}) if p == CUDA and torch.cuda.is_available()
                         else p for p in requested]
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=provider_opts)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise OnnxModelError(f"cannot load ONNX model {self.path}: {type(e).__name__}: {e}") from e
        if CUDA in requested and CUDA not in self.session.get_providers() and providers != "auto":
            warnings.warn(f"{self.path.name}: asked for {CUDA}, onnxruntime gave {self.session.get_providers()}",
                          RuntimeWarning, stacklevel=2)

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise OnnxModelError(f"{self.path}: a classifier takes one input, this graph takes "
                                 f"{[i.name for i in inputs]}")
        inp, out = inputs[0], outputs[0]
        if inp.shape is None or len(inp.shape) != 4:
            raise OnnxModelError(f"{self.path}: input {inp.name!r} must be [N,C,H,W], the graph says {inp.shape}")
        if out.shape is None or len(out.shape) != 2:
            raise OnnxModelError(f"{self.path}: output {out.name!r} must be logits [N,K], the graph says "
                                 f"{out.shape}")
        if _dim(inp.shape[0]) is not None:
            raise OnnxModelError(f"{self.path}: the batch axis is fixed at {inp.shape[0]} (input {inp.shape}); "
                                 f"OrtClassifier needs a dynamic batch: re-export with dynamic_batch=True")
        if _dim(out.shape[0]) is not None:
            raise OnnxModelError(f"{self.path}: the output batch axis is fixed at {out.shape[0]} (output "
                                 f"{out.shape}) while the input's is dynamic: the model bakes in a batch size")
        dtypes = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                  "tensor(double)": torch.float64}
        if inp.type not in dtypes:
            raise OnnxModelError(f"{self.path}: input type {inp.type} is not a float image tensor")
        self.dtype = dtypes[inp.type]
        self.input_name, self.output_name = inp.name, out.name
        self.input_shape = tuple(_dim(d) for d in inp.shape)
        self._num_classes = _dim(out.shape[1])
        self._out_dtype = dtypes.get(out.type, torch.float32)
        self._cuda = self.session.get_providers()[0] == CUDA
        self._device_id = int(self.session.get_provider_options().get(CUDA, {}).get("device_id", 0)) \
            if self._cuda else None

    @property
    def providers(self) -> list:
        """The providers the session actually uses (``session.get_providers()``), first = preferred."""
        return self.session.get_providers()

    @property
    def num_classes(self) -> int | None:
        """K, from the graph (or from the first call when the graph leaves it symbolic)."""
        return self._num_classes

    def __repr__(self) -> str:
        shape = ", ".join("N" if d is None else str(d) for d in self.input_shape)
        return f"OrtClassifier({str(self.path)!r}, input [{shape}], K={self.num_classes}, providers={self.providers})"

    def _check(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise OnnxInputError(f"input must be a torch.Tensor [N,C,H,W], got {type(x).__name__}")
        if x.dim() != 4:
            raise OnnxInputError(f"input must be [N,C,H,W] (rank 4), got shape {tuple(x.shape)}"
                                 + ("; add a batch axis: x[None]" if x.dim() == 3 else ""))
        for axis, (want, got) in enumerate(zip(self.input_shape[1:], x.shape[1:]), start=1):
            if want is not None and want != got:
                what = ("channels", "height", "width")[axis - 1]
                raise OnnxInputError(f"input {what} must be {want} ({self.path.name} takes "
                                     f"[N,{','.join(str(d) for d in self.input_shape[1:])}]), got shape "
                                     f"{tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise OnnxInputError(f"input dtype must be {self.dtype} (the graph's), got {x.dtype}; cast it, e.g. "
                                 f"x.to({self.dtype})")
        return x.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x)
        n = x.shape[0]
        if n == 0 and self._num_classes is not None:
            return torch.empty(0, self._num_classes, dtype=self._out_dtype, device=x.device)
        if self._cuda and x.is_cuda and n > 0:
            out = self._run_cuda(x)
        else:
            xs = x.cpu()
            out = torch.from_numpy(self.session.run([self.output_name], {self.input_name: xs.numpy()})[0])
            out = out.to(x.device)
        if out.dim() != 2 or out.shape[0] != n:
            raise OnnxModelError(f"{self.path}: expected logits [{n},K] for a batch of {n}, got {tuple(out.shape)}")
        if self._num_classes is None:
            self._num_classes = int(out.shape[1])
        return out

    forward = __call__

    def _run_cuda(self, x: torch.Tensor) -> torch.Tensor:
        src_device = x.device
        if x.device.index != self._device_id:
            x = x.to(torch.device("cuda", self._device_id))
        torch.cuda.current_stream(x.device).synchronize()   # ORT runs on its own stream
        binding = self.session.io_binding()                   # per call: IO bindings are not shareable
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
        binding.bind_input(self.input_name, "cuda", self._device_id, np_dtype[x.dtype], list(x.shape), x.data_ptr())
        if self._num_classes is not None:
            out = torch.empty(x.shape[0], self._num_classes, dtype=self._out_dtype, device=x.device)
            binding.bind_output(self.output_name, "cuda", self._device_id, np_dtype[out.dtype], list(out.shape),
                                out.data_ptr())
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        else:
            binding.bind_output(self.output_name, "cuda", self._device_id)
            self.session.run_with_iobinding(binding)
            out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(x.device)
        return out.to(src_device)
