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
from .export import (BATCH_DIM, CPU, CUDA, EXPORTERS, ExportReport, OnnxError, OnnxExportError, OnnxInputError,
                     OnnxModelError, OnnxParityError, export_classifier)
from .runtime import OrtClassifier, resolve_providers

__all__ = ["ExportReport", "OnnxError", "OnnxExportError", "OnnxParityError", "OnnxModelError", "OnnxInputError",
           "export_classifier", "OrtClassifier", "resolve_providers", "BATCH_DIM", "CPU", "CUDA", "EXPORTERS"]
