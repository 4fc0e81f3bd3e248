"""Ray Serve: a deployment of :class:`ExplainWorker` replicas that batches concurrent requests, and a
client whose ``submit(x) -> Future`` matches :class:`~medcam_fast.medcam.service.ExplainerService`.

The batch handler (``@serve.batch``) groups the requests of one image shape and seed into one
Explainer call, run in a thread so the replica's event loop stays free for health checks and new
requests. Queues are bounded: ``max_ongoing_requests`` per replica and ``max_queued_requests``
waiting in front of them; beyond that a request fails at once with
:class:`~medcam_fast.medcam.service.ServiceFull` (back-pressure, not unbounded memory). A replica
that dies is replaced by Serve; the client sends its requests again (explanations are
deterministic per seed, so a retry gives the same answer).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..medcam.service import ServiceClosed, ServiceFull
from . import require_ray
from .worker import ExplainResult, ExplainWorker, ModelSpec

DEFAULT_APP = "medcam_fast"


def _deployment_class():
    from ray import serve

    @serve.deployment
    class ExplainDeployment:
        """One replica: an :class:`ExplainWorker` and its batch queue."""

        def __init__(self, model, config, seed: int, max_batch: int, batch_wait_s: float, worker_cls):
            self.worker = worker_cls(model, config, seed=seed)
            self.explain.set_max_batch_size(max_batch)
            self.explain.set_batch_wait_timeout_s(batch_wait_s)
            self.broken: str | None = None

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def explain(self, requests: list[tuple]) -> list[ExplainResult]:
            """``requests``: ``(x float [C,H,W], seed, id)`` each; one result each, in order."""
            out: list = [None] * len(requests)
            groups: dict = {}
            for j, (x, seed, _) in enumerate(requests):
                groups.setdefault((tuple(x.shape), int(seed)), []).append(j)
            for (_, seed), idx in groups.items():
                x = np.stack([requests[j][0] for j in idx])
                ids = [requests[j][2] for j in idx]
                try:   # the fit off the event loop: health checks and queueing go on meanwhile
                    results = await asyncio.to_thread(self.worker.explain_arrays, x, ids, seed)
                except Exception as exc:  # noqa: BLE001 - an unexpected fault: unhealthy, Serve replaces us
                    self.broken = f"{type(exc).__name__}: {exc}"
                    raise
                for j, r in zip(idx, results):
                    out[j] = r
            return out

        def check_health(self):
            if self.broken:
                raise RuntimeError(f"explainer worker failed: {self.broken}")

        def info(self) -> dict:
            return {"pid": self.worker.pid, "class_names": self.worker.class_names, "device": str(self.worker.device)}

    return ExplainDeployment


def serve_explainer(model, config=None, replicas: int = 1, max_batch: int = 8, batch_wait_s: float = 0.05,
                    max_ongoing_requests: int = 16, max_queued_requests: int = 64, cpus_per_replica: float = 1,
                    gpus_per_replica: float = 0, seed: int = 0, name: str = DEFAULT_APP,
                    health_check_period_s: float = 2.0, worker_cls=ExplainWorker):
    """Deploys ``replicas`` explainer replicas as the Serve application ``name``; returns its handle.

    Without ``ray.init`` first, a local Ray instance is started. A cluster too small for the replicas is a ValueError; one
    whose CPUs other work holds makes this wait until they are free. Serve's HTTP proxy is not
    started: requests go through the handle (:class:`ServeClient`). ``max_ongoing_requests`` should be
    at least ``max_batch`` so a replica can fill a batch."""
    require_ray()
    from ray import serve

    spec = ModelSpec.of(model)
    if replicas < 1 or max_batch < 1 or max_queued_requests < 1 or max_ongoing_requests < 1:
        raise ValueError("replicas, max_batch, max_ongoing_requests and max_queued_requests must be >= 1")
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    need = replicas * cpus_per_replica
    total = ray.cluster_resources().get("CPU", 0)
    if need > total:   # Serve would wait for the replicas forever
        raise ValueError(f"{replicas} replica(s) x {cpus_per_replica} CPU need {need:g} CPUs; the Ray cluster has "
                         f"{total:g}")
    serve.start(proxy_location="Disabled")
    dep = _deployment_class().options(
        num_replicas=replicas, max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        health_check_period_s=health_check_period_s, health_check_timeout_s=max(30.0, 10 * health_check_period_s),
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    return serve.run(dep.bind(spec, config, seed, max_batch, batch_wait_s, worker_cls), name=name, route_prefix=None)


class ServeClient:
    """``submit(x) -> Future[ExplainResult]`` against a deployment from :func:`serve_explainer`.

    Args:
        handle: the deployment handle (or the application's name).
        retries: resends of a request whose replica died (deterministic per seed: same answer).
        timeout: seconds one attempt may take (None: no limit).
        max_pending: requests in flight from this client (the threads that wait on them).

    A request the deployment's queues refuse fails with :class:`ServiceFull` at once; after
    :meth:`close`, ``submit`` raises :class:`ServiceClosed`.
    """

    def __init__(self, handle, retries: int = 3, timeout: float | None = None, max_pending: int = 64):
        require_ray()
        from ray import serve

        self.handle = serve.get_app_handle(handle) if isinstance(handle, str) else handle
        self.retries, self.timeout = int(retries), timeout
        self._pool = ThreadPoolExecutor(max_workers=max_pending, thread_name_prefix="medcam-serve-client")
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self.resent = 0                 # attempts made again after a replica died

    def submit(self, x, seed: int = 0, id: str | None = None) -> Future:
        """Sends one image ``x`` ``[C,H,W]`` (preprocessed; torch or numpy); its future gives an
        :class:`ExplainResult` (``id``: its id, default a running number)."""
        a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"x must be a float [C,H,W] image, got {a.dtype} {tuple(a.shape)}")
        with self._lock:
            if self._closed:
                raise ServiceClosed("the client was closed")
            return self._pool.submit(self._call, np.ascontiguousarray(a, dtype=np.float32), int(seed),
                                     str(next(self._ids)) if id is None else str(id))

    def _call(self, x: np.ndarray, seed: int, rid: str) -> ExplainResult:
        import ray.exceptions as rex
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        died = (rex.RayActorError, rex.ActorUnavailableError, DeploymentUnavailableError)
        for attempt in range(self.retries + 1):
            try:
                return self.handle.explain.remote((x, seed, rid)).result(timeout_s=self.timeout)
            except BackPressureError as exc:
                raise ServiceFull(f"the deployment's queues are full: {exc}") from exc
            except died:
                if attempt == self.retries:
                    raise
                self.resent += 1
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
        raise AssertionError("unreachable")

    def close(self, wait: bool = True) -> None:
        """No new requests; ``wait``: until those in flight resolve."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
