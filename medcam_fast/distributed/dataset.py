"""Ray Data: explain a whole archive with a pool of :class:`ExplainWorker` actors into Parquet.

Each image is one row (:data:`SCHEMA`): its id, the classifier's call, both sides' statuses and
areas, both masks packed one bit per pixel, and an error column. The driver writes every block it
receives as its own part file, atomically (temp file, then rename), so a killed run keeps every
finished block, and a rerun skips the ids already written (``resume``, the default). A worker that
dies is restarted by Ray and its batch redone; a batch is delivered once, so no id is written twice.
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runstate import check_manifest
from . import require_ray
from .worker import ROW_FIELDS, ExplainResult, ExplainWorker, ModelSpec

_ARROW_TYPES = {int: "int64", float: "float64", str: "string", bool: "bool_"}


def schema():
    """The pyarrow schema of a result row."""
    import pyarrow as pa

    cols = [("id", pa.string()), ("path", pa.string())]
    cols += [(k, getattr(pa, _ARROW_TYPES[t])()) for k, t in ROW_FIELDS.items()]
    cols += [("height", pa.int32()), ("width", pa.int32()), ("mask", pa.binary()), ("necessary_mask", pa.binary()),
             ("error", pa.string()), ("worker", pa.int64())]
    return pa.schema(cols)


def to_table(results: list[ExplainResult], paths: dict, worker: int):
    """A pyarrow Table of ``results`` (``paths``: id -> source path or None)."""
    import pyarrow as pa

    recs = [{**r.record(), "path": paths.get(r.id), "worker": worker} for r in results]
    return pa.Table.from_pylist(recs, schema=schema())


class _DataActor:
    """The map_batches callable: one :class:`ExplainWorker` per actor."""

    def __init__(self, model, config, seed, worker_cls=ExplainWorker):
        self.worker = worker_cls(model, config, seed=seed)

    def __call__(self, batch: dict):
        ids = [str(i) for i in batch["id"]]
        if "image" in batch:
            results = self.worker.explain_arrays(np.stack(list(batch["image"])).astype(np.float32), ids)
            paths = {}
        else:
            paths = dict(zip(ids, map(str, batch["path"])))
            results = self.worker.explain_paths([paths[i] for i in ids], ids)
        return to_table(results, paths, self.worker.pid)


@dataclass
class DatasetRun:
    """What :func:`explain_dataset` did: rows written now, ids skipped as already written, error
    rows, part files written, seconds (start of the pool included)."""

    written: int
    skipped: int
    errors: int
    files: int
    seconds: float
    out: str


def _done_ids(out: Path) -> set:
    import pyarrow.parquet as pq

    for stray in out.glob("*.parquet.part"):   # a write the last run did not finish: redone
        stray.unlink()
    done = set()
    for f in sorted(out.glob("part-*.parquet")):
        done.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return done


def _write_part(out: Path, table) -> None:
    import pyarrow.parquet as pq

    path = out / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    part = path.with_name(path.name + ".part")
    pq.write_table(table, part)
    part.replace(path)


def _items(inputs, mask_dir=None):
    """``[{"id", "path"}]`` of files, folders and CSVs (``medcam_fast.data.collect_inputs``)."""
    from ..data.collect import collect_inputs

    samples, failures = collect_inputs(inputs, mask_dir)
    if failures:
        raise ValueError(f"unreadable input {failures[0]['path']}: {failures[0]['error']}")
    ids = [str(s.path) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("an input file is named twice")
    return [{"id": i, "path": i} for i in ids]


def explain_dataset(inputs, model, out, config=None, workers: int = 2, batch: int = 8, seed: int = 0,
                    address: str | None = None, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                    resume: bool = True, worker_cls=ExplainWorker, progress: bool = True) -> DatasetRun:
    """Explains every image of ``inputs`` into Parquet part files under ``out``.

    Args:
        inputs: image files, folders or CSVs (as the CLI's ``--input``), ids their paths; or a
            ``ray.data.Dataset`` with an ``id`` column and a ``path`` column (files) or an ``image``
            column (float ``[C,H,W]``, preprocessed for the classifier).
        model: a :class:`ModelSpec` (or spec string), loaded inside each worker.
        out: the output folder (``part-*.parquet``, ``manifest.json``).
        config: :class:`~medcam_fast.MedCAMConfig` (default: the package's).
        workers: actors in the pool; 0 runs one :class:`ExplainWorker` in this process, no Ray.
        batch: images per Explainer call.
        address: a Ray cluster (``ray://host:10001`` or ``auto``); None starts a local one with
            ``workers * cpus_per_worker`` CPUs unless Ray is already initialised.
        resume: skip the ids already written (the manifest must match); False starts over.
        worker_cls: the worker class (a subclass of :class:`ExplainWorker`).

    Returns:
        :class:`DatasetRun`. Read the rows with :func:`read_results`.
    """
    from ..medcam import MedCAMConfig
    from ..models.fingerprint import classifier_fingerprint

    spec = ModelSpec.of(model)
    cfg = (config or MedCAMConfig()).validate()
    if batch < 1 or workers < 0:
        raise ValueError(f"batch must be >= 1 and workers >= 0, got {batch} and {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fingerprint = classifier_fingerprint(spec.load("cpu").model)
    check_manifest(out, {"kind": "medcam_fast.explain_dataset/1", "classifier": fingerprint, "model": spec.spec,
                         "size": spec.size, "mean": spec.mean, "std": spec.std, "config": cfg.to_dict(),
                         "seed": seed, "batch": batch}, resume, has_records=any(out.glob("part-*.parquet")))
    if not resume:
        for f in out.glob("part-*.parquet"):
            f.unlink()
    done = _done_ids(out)
    is_ray_dataset = type(inputs).__name__ == "Dataset" and hasattr(inputs, "map_batches")
    written = errors = files = 0

    def take(table):
        nonlocal written, errors, files
        if table.num_rows:
            _write_part(out, table)
            written += table.num_rows
            errors += table.num_rows - table.column("error").null_count
            files += 1
            if progress:
                print(f"explain_dataset: {written} written ({errors} errors), {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)

    if workers == 0:
        if is_ray_dataset:
            raise ValueError("a Ray dataset needs workers >= 1")
        items = _items(inputs)
        todo = [it for it in items if it["id"] not in done]
        w = worker_cls(spec, cfg, seed=seed)
        for b in range(0, len(todo), batch):
            chunk = todo[b:b + batch]
            take(to_table(w.explain_paths([c["path"] for c in chunk], [c["id"] for c in chunk]),
                          {c["id"]: c["path"] for c in chunk}, w.pid))
        return DatasetRun(written, len(items) - len(todo), errors, files, time.perf_counter() - t0, str(out))

    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else int(np.ceil(workers * cpus_per_worker)),
                 include_dashboard=False, log_to_driver=False)
    if is_ray_dataset:
        ds = inputs
        total = ds.count()
        if done:
            ds = ds.filter(lambda r, done=frozenset(done): str(r["id"]) not in done)
    else:
        items = _items(inputs)
        total = len(items)
        todo = [it for it in items if it["id"] not in done]
        if not todo:
            return DatasetRun(0, total, 0, 0, time.perf_counter() - t0, str(out))
        ds = ray.data.from_items(todo, override_num_blocks=max(1, -(-len(todo) // batch)))
    results = ds.map_batches(_DataActor, fn_constructor_kwargs={"model": spec, "config": cfg, "seed": seed,
                                                                "worker_cls": worker_cls},
                             batch_size=batch, batch_format="numpy", concurrency=workers, num_cpus=cpus_per_worker,
                             num_gpus=gpus_per_worker)
    for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
        take(table)
    return DatasetRun(written, total - written, errors, files, time.perf_counter() - t0, str(out))


def read_results(out, as_table: bool = False):
    """Every row under ``out``: a list of :class:`ExplainResult` with ``row["path"]`` and
    ``row["worker"]`` added (or the pyarrow Table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(out).glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else schema().empty_table()
    if as_table:
        return table
    results = []
    for rec in table.to_pylist():
        r = ExplainResult.from_record(rec)
        r.row.update(path=rec["path"], worker=rec["worker"])
        results.append(r)
    return results
