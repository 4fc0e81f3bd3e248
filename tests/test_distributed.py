"""medcam_fast.distributed on a real local Ray cluster (2 CPUs, a small object store, no dashboard;
one cluster for the module): Serve gives what the in-process service gives, back-pressure refuses
instead of queueing without bound, a replica killed under load leaves every future resolved, Ray
Data writes every id of PNG and DICOM inputs exactly once, also when a worker dies mid-batch, and a
rerun skips what is written. A tiny classifier (TorchScript, 64²) and few fit steps."""
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="medcam_fast[ray] is not installed (CI installs it: requirements.txt)")

from medcam_fast import MedCAMConfig  # noqa: E402
from medcam_fast.distributed import (ExplainWorker, ModelSpec, ServeClient, explain_dataset,  # noqa: E402
                                     read_results, serve_explainer)
from medcam_fast.medcam.service import ExplainerService, ServiceFull  # noqa: E402

from planted import make_planted, train_tiny_cnn  # noqa: E402
from test_data import write_dicom  # noqa: E402

CFG = MedCAMConfig(steps=12, fit=dict(min_steps=6, check_every=6), checks=dict(n_random=4))
OFFSET, SCALE = 0.4, 0.4          # PNG pixel u = x * SCALE + OFFSET; the spec's mean/std undo it


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, object_store_memory=80 * 1024 ** 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the test's worker classes
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = train_tiny_cnn(seed=0)
    path = folder / "tiny.pt2"         # torch.export: TorchScript's profiling executor re-specialises as
    program = torch.export.export(model, (torch.zeros(2, 1, 64, 64),),   # it warms, so its float rounding
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))   # moves with history
    torch.export.save(program, str(path))
    return ModelSpec(str(path), size=(64, 64), mean=(OFFSET,), std=(SCALE,), device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """64 PNGs and 8 DICOMs of planted images."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("archive")
    x, _, _ = make_planted(72, seed=7)
    u = (x[:, 0] * SCALE + OFFSET).clamp(0, 1).numpy()
    paths = []
    for i in range(64):
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray((u[i] * 255).round().astype(np.uint8)).save(paths[-1])
    for i in range(64, 72):
        paths.append(write_dicom(folder / f"img{i:02d}.dcm", (u[i] * 4000).round()))
    return paths


@pytest.fixture
def app():
    """A Serve application name, deleted after the test (its replicas hold the cluster's CPUs)."""
    from ray import serve

    names = []
    yield lambda name: names.append(name) or name
    for name in names:
        serve.delete(name)


def _same(a, b) -> bool:
    return (a.row["status"] == b.row["status"] and a.row["necessary_status"] == b.row["necessary_status"]
            and np.array_equal(a.mask, b.mask) and np.array_equal(a.necessary_mask, b.necessary_mask))


def _replay(worker, results, x_by_id):
    """Each result against the in-process worker's call on the batch the replica made."""
    for r in results:
        j = r.batch.index(r.id)
        again = worker.explain_arrays(np.stack([x_by_id[i] for i in r.batch]), list(r.batch))[j]
        assert _same(r, again) and r.row["area"] == again.row["area"], (r.id, r.batch, r.row, again.row, (r.mask != again.mask).sum(), (r.necessary_mask != again.necessary_mask).sum())


@pytest.mark.slow
def test_serve_gives_the_in_process_services_results(cluster, spec, images, app):
    handle = serve_explainer(spec, CFG, replicas=1, max_batch=4, name=app("parity"))
    local = ExplainWorker(spec, CFG, threads=1)       # as the replica: float rounding follows the threads
    x = {str(i): local.preprocess(p) for i, p in enumerate(images[:16])}
    with ServeClient(handle) as client:
        futures = [client.submit(xi, id=i) for i, xi in x.items()]    # 16 concurrent requests
        remote = [f.result(timeout=300) for f in futures]
    assert all(r.error is None for r in remote) and [r.id for r in remote] == list(x)
    assert max(len(r.batch) for r in remote) > 1, "no request was batched with another"
    _replay(local, remote, x)                                        # bit for bit the same calls
    with ExplainerService(local.explainer, max_batch=4) as service:
        direct = [f.result(timeout=300) for f in [service.submit(torch.from_numpy(xi)) for xi in x.values()]]
    for r, d in zip(remote, direct):                                  # the in-process service: same calls
        assert r.row["label"] == int(d.label[0]) and r.row["prob_input"] == pytest.approx(float(d.prob_input[0]))
    assert {r.row["status"] for r in remote} - {"null_keeps_label"}, "every image untestable: the test shows nothing"
    with pytest.raises(ValueError, match=r"float \[C,H,W\]"):
        ServeClient(handle).submit(np.zeros((64, 64), np.float32))


@pytest.mark.slow
def test_serve_refuses_beyond_its_bounded_queues_and_never_hangs(cluster, spec, images, app):
    handle = serve_explainer(spec, CFG, replicas=1, max_batch=1, max_ongoing_requests=1, max_queued_requests=1,
                             name=app("bounded"))
    local = ExplainWorker(spec, CFG)
    with ServeClient(handle) as client:
        assert client.submit(local.preprocess(images[0])).result(timeout=300).error is None   # the router has its config
        futures = [client.submit(local.preprocess(p)) for p in images[:10]]
        done = [f.exception(timeout=300) for f in futures]              # each resolves: none hangs
    refused = sum(isinstance(e, ServiceFull) for e in done)
    assert refused >= 1 and sum(e is None for e in done) >= 2 and all(e is None or isinstance(e, ServiceFull)
                                                                       for e in done)


class SlowFirstBatch(ExplainWorker):
    """Holds its first batch 3 s, so a replica killed at 1 s surely has requests in flight."""

    def explain_arrays(self, x, ids, seed=None):
        if not getattr(self, "_held", False):
            self._held = True
            time.sleep(3.0)
        return super().explain_arrays(x, ids, seed)


@pytest.mark.slow
def test_a_replica_killed_under_load_leaves_every_future_resolved(cluster, spec, images, app):
    handle = serve_explainer(spec, CFG.replace(steps=40, fit=dict(min_steps=40)), replicas=2, max_batch=2, name=app("killed"),
                             worker_cls=SlowFirstBatch)
    local = ExplainWorker(spec, CFG)
    x = [local.preprocess(p) for p in images[:12]]
    pids = {handle.info.remote().result(timeout_s=60)["pid"] for _ in range(20)}
    with ServeClient(handle, retries=5) as client:
        futures = [client.submit(xi, id=str(i)) for i, xi in enumerate(x)]
        time.sleep(1.0)
        os.kill(sorted(pids)[0], signal.SIGKILL)                      # one replica dies mid-batch
        results = [f.result(timeout=600) for f in futures]             # resent to the other, or its restart
    assert all(r.error is None for r in results) and len(results) == 12
    assert client.resent >= 1
    _replay(ExplainWorker(spec, CFG.replace(steps=40, fit=dict(min_steps=40)), threads=1), results,
            dict(zip(map(str, range(12)), x)))


@pytest.mark.slow
def test_data_writes_every_png_and_dicom_once_and_resumes(cluster, spec, images, tmp_path):
    run = explain_dataset(images, spec, tmp_path / "out", CFG, workers=2, batch=8, progress=False)
    rows = read_results(tmp_path / "out")
    ids = [r.id for r in rows]
    assert run.written == 72 and sorted(ids) == sorted(map(str, images)) and len(set(ids)) == 72
    assert all(r.error is None for r in rows) and all(r.mask.shape == (64, 64) for r in rows)
    assert len({r.row["worker"] for r in rows}) == 2                  # both actors worked
    local = ExplainWorker(spec, CFG, threads=1)
    by = {r.id: r for r in rows}
    for r in local.explain_paths(images[:8]):                          # the same explanation as in-process
        assert _same(r, by[r.id])
    again = explain_dataset(images, spec, tmp_path / "out", CFG, workers=2, batch=8, progress=False)
    assert again.written == 0 and again.skipped == 72
    with pytest.raises(ValueError, match="cannot be resumed"):
        explain_dataset(images, spec, tmp_path / "out", CFG.replace(steps=13), workers=2, batch=8, progress=False)


def test_in_process_run_needs_no_cluster_and_matches_the_worker(spec, images, tmp_path):
    """workers=0: the same worker in this process, the same Parquet parts, the same resume."""
    run = explain_dataset(images[60:68], spec, tmp_path / "out", CFG, workers=0, batch=4, progress=False)
    rows = read_results(tmp_path / "out")
    assert run.written == 8 and sorted(r.id for r in rows) == sorted(map(str, images[60:68]))
    assert all(r.error is None for r in rows) and {r.row["worker"] for r in rows} == {os.getpid()}
    by = {r.id: r for r in rows}
    for r in ExplainWorker(spec, CFG).explain_paths(images[60:64]):     # the first batch, replayed
        assert _same(r, by[r.id])
    assert explain_dataset(images[60:68], spec, tmp_path / "out", CFG, workers=0, batch=4, progress=False).skipped == 8
    with pytest.raises(ValueError, match="workers >= 0"):
        explain_dataset(images, spec, tmp_path / "bad", CFG, workers=-1)


class ExitsOnce(ExplainWorker):
    """Dies (the whole process, no cleanup) in the middle of its first batch while the marker exists."""

    MARKER = None

    def explain_arrays(self, x, ids, seed=None):
        try:                                    # one worker wins the marker (rename is atomic), once
            os.rename(self.MARKER, self.MARKER + ".taken")
        except FileNotFoundError:
            return super().explain_arrays(x, ids, seed)
        assert super().explain_arrays(x[: len(ids) // 2], ids[: len(ids) // 2], seed)   # half the batch done
        os._exit(1)


@pytest.mark.slow
def test_a_worker_that_exits_mid_batch_loses_nothing_and_writes_nothing_twice(cluster, spec, images, tmp_path):
    marker = tmp_path / "die-once"
    marker.touch()
    ExitsOnce.MARKER = str(marker)          # the class travels by value: the workers see it
    t0 = time.perf_counter()
    run = explain_dataset(images[:24], spec, tmp_path / "out", CFG, workers=2, batch=4, progress=False,
                          worker_cls=ExitsOnce)
    assert not marker.exists() and (tmp_path / "die-once.taken").exists(), "no worker died: no fault injected"
    rows = read_results(tmp_path / "out")
    ids = [r.id for r in rows]
    assert sorted(ids) == sorted(map(str, images[:24])) and len(set(ids)) == len(ids) == 24
    assert all(r.error is None for r in rows) and run.written == 24
    print(f"fault run: {time.perf_counter() - t0:.1f} s")
