"""``ExplainerService``: micro-batching for screening. Concurrent single-image requests that arrive
within a short window are fitted in one batched call of the same :class:`Explainer`, and each
caller gets its own result through a ``Future``.

Batching pays on a CPU as on a GPU: one step over N stacked U-Nets and one classifier pass over
N images cost less than N steps of one (docs/speed.md, "Fit-step speed"). A batch holds requests with the same
image shape, seed and kind of target (top-1 or given), so it is exactly the direct call
``explainer(stack(xs), target, seed)``; its result is split per request.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from .explainer import Explainer
from .result import Explanation


class ServiceFull(RuntimeError):
    """The request queue is at ``max_queue``: the caller should back off and retry."""


class ServiceClosed(RuntimeError):
    """The service was closed: no new requests are taken."""


@dataclass
class _Request:
    x: torch.Tensor                # [C,H,W]
    target: int | None
    seed: int
    deadline: float                # time.monotonic() after which it fails unstarted (inf: never)
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        """What a batch shares: images of one shape, dtype and device stack into one call."""
        return (tuple(self.x.shape), self.x.dtype, str(self.x.device), self.seed, self.target is None)


@dataclass
class BatchRecord:
    """One batched call the service made: its request order and size (for audits and tests)."""

    ids: list[int]
    seconds: float


class ExplainerService:
    """A worker thread in front of an :class:`Explainer` that gathers requests into batches.

    Args:
        explainer: the warm Explainer (one model; its config decides the fit).
        max_batch: most requests per batched call.
        window: seconds the worker waits for more requests after the first of a batch arrives.
        max_queue: most requests waiting; ``submit`` raises :class:`ServiceFull` beyond it.
        timeout: default seconds a request may wait in the queue before it fails with
            ``TimeoutError`` unstarted (None: no limit). A started batch always finishes.
        record: keep a :class:`BatchRecord` per call in ``batches`` (the last 1000).

    Use as a context manager, or call :meth:`close`. Thread-safe: any thread may ``submit``.
    """

    def __init__(self, explainer: Explainer, max_batch: int = 8, window: float = 0.05, max_queue: int = 256,
                 timeout: float | None = None, record: bool = True):
        if not isinstance(explainer, Explainer):
            raise ValueError(f"explainer must be a medcam_fast Explainer, got {type(explainer).__name__}")
        if max_batch < 1 or max_queue < 1 or window < 0 or (timeout is not None and timeout <= 0):
            raise ValueError("max_batch and max_queue must be >= 1, window >= 0 and timeout > 0 or None")
        self.explainer, self.max_batch, self.window, self.timeout = explainer, int(max_batch), float(window), timeout
        self._queue: queue.Queue = queue.Queue(maxsize=int(max_queue))
        self._held: deque = deque()      # requests taken from the queue that did not fit the last batch
        self._closed = threading.Event()
        self._cancel = False
        self._ids = iter(range(1 << 62))
        self._submit_lock = threading.Lock()   # "closed" and an enqueue never interleave
        self.worker_error: BaseException | None = None
        self._id_lock = threading.Lock()
        self.batches: deque = deque(maxlen=1000) if record else deque(maxlen=0)
        self._worker = threading.Thread(target=self._run, name="medcam-fast-service", daemon=True)
        self._worker.start()

    # --- client side
    def submit(self, x: torch.Tensor, target: int | None = None, seed: int = 0,
               timeout: float | None = None) -> Future:
        """Queues one image ``x`` ``[C,H,W]`` (or ``[1,C,H,W]``); the Future's result is its
        :class:`Explanation` (N = 1); ``future.request_id`` names it in :attr:`batches`.

        ``timeout``: this request's queue limit (default the service's). Raises ValueError for a
        bad input, :class:`ServiceFull` or :class:`ServiceClosed`."""
        if self._closed.is_set():
            raise ServiceClosed("the ExplainerService is closed")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("x must be a floating torch.Tensor [C,H,W] or [1,C,H,W]")
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3:
            raise ValueError(f"one image per request: x must be [C,H,W] or [1,C,H,W], got {tuple(x.shape)}")
        if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
            raise ValueError(f"target must be None or an int class index, got {type(target).__name__}")
        limit = self.timeout if timeout is None else timeout
        req = _Request(x.detach(), target, int(seed), time.monotonic() + limit if limit else float("inf"))
        with self._id_lock:
            req.id = next(self._ids)
        req.future.request_id = req.id
        with self._submit_lock:   # a request enqueued here is seen by the worker before it can stop
            if self._closed.is_set():
                raise ServiceClosed("the ExplainerService is closed")
            try:
                self._queue.put_nowait(req)
            except queue.Full:
                raise ServiceFull(f"{self._queue.maxsize} requests are waiting; retry later") from None
        return req.future

    def explain(self, x: torch.Tensor, target: int | None = None, seed: int = 0,
                timeout: float | None = None) -> Explanation:
        """``submit(...).result()``: blocks until this image's Explanation is ready."""
        return self.submit(x, target, seed, timeout).result()

    def close(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Takes no new requests; the queued ones are served (or cancelled with
        ``cancel_pending``); with ``wait``, returns when the worker has stopped."""
        self._cancel = self._cancel or cancel_pending
        with self._submit_lock:
            self._closed.set()
        if wait:
            self._worker.join()

    def __enter__(self) -> "ExplainerService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- worker side
    def _drain(self) -> list:
        out = list(self._held)
        self._held.clear()
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _next(self, block: float | None) -> _Request | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=block) if block else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self) -> list[_Request]:
        """The next batch: the first live request, then those with its key arriving within the
        window (up to ``max_batch``); requests of other keys wait for a later batch."""
        first = None
        while first is None:
            if self._cancel:
                for req in self._drain():
                    req.future.cancel()
                return []
            if self._closed.is_set() and not self._held and self._queue.empty():
                return []
            first = self._next(block=0.1)
            if first is not None and not self._live(first):
                first = None
        batch, others = [first], []
        end = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            if self._held:   # already waiting: no need to wait for them
                req = self._held.popleft()
            else:
                left = end - time.monotonic()
                req = self._next(block=left) if left > 0 else self._next(block=None)
                if req is None:
                    break
            if not self._live(req):
                continue
            (batch if req.key == first.key else others).append(req)
        self._held.extendleft(reversed(others))
        return batch

    @staticmethod
    def _live(req: _Request) -> bool:
        """False (and the request failed or dropped) when it timed out or its caller cancelled it."""
        if req.future.cancelled():
            return False
        if time.monotonic() > req.deadline:
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(TimeoutError("the request waited longer than its timeout in the queue"))
            return False
        return True

    def _run(self) -> None:
        """Serves batches until closed and empty. Should anything fail outside a batch's own
        error handling, the service closes (``worker_error`` says why) and every request taken or
        waiting fails with ServiceClosed: no Future is left unresolved, and ``submit`` raises
        ServiceClosed from then on."""
        batch: list[_Request] = []
        try:
            while True:
                batch = self._gather()
                if not batch:
                    return
                self._serve(batch)
                batch = []
        except BaseException as exc:   # noqa: BLE001 - handed to every waiting caller below
            self.worker_error = exc
        finally:
            with self._submit_lock:
                self._closed.set()
            why = "was closed" if self.worker_error is None else f"stopped: {self.worker_error!r}"
            for req in [*batch, *self._drain()]:
                try:
                    if not req.future.done():
                        req.future.set_exception(ServiceClosed(f"the ExplainerService {why}"))
                except InvalidStateError:   # cancelled by its caller meanwhile
                    pass

    def _serve(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]   # not cancelled meanwhile
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            x = torch.stack([r.x for r in batch])
            target = None if batch[0].target is None else torch.tensor([r.target for r in batch])
            res = self.explainer(x, target=target, seed=batch[0].seed)
        except Exception as exc:  # one bad request must not fail the others: serve them one by one
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for r in batch:
                self._serve_one(r)
            return
        self.batches.append(BatchRecord([r.id for r in batch], time.perf_counter() - t0))
        for i, r in enumerate(batch):
            try:
                r.future.set_result(res.select(i))
            except Exception as exc:  # noqa: BLE001 - this caller's result only
                r.future.set_exception(exc)

    def _serve_one(self, r: _Request) -> None:
        t0 = time.perf_counter()
        try:
            res = self.explainer(r.x[None], target=r.target, seed=r.seed)
        except Exception as exc:
            r.future.set_exception(exc)
            return
        self.batches.append(BatchRecord([r.id], time.perf_counter() - t0))
        r.future.set_result(res)
