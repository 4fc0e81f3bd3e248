"""ExplainerService: concurrent clients get the results of the batched calls the service made,
one bad request fails alone, and the queue bound, the timeout and the shutdown behave."""
import threading
import time

import pytest
import torch

from medcam_fast import Explainer, MedCAMConfig
from medcam_fast.medcam.service import ExplainerService, ServiceClosed, ServiceFull

from planted import make_planted, train_tiny_cnn

CFG = MedCAMConfig(steps=20, fit=dict(min_steps=10, check_every=10), checks=dict(n_random=4))


@pytest.fixture(scope="module")
def setup():
    model = train_tiny_cnn(seed=0)
    x, _, _ = make_planted(6, seed=31, positive_only=True)
    return model, x


def _same(a, b):
    return (torch.equal(a.mask, b.mask) and torch.equal(a.soft_mask, b.soft_mask) and torch.equal(a.label, b.label)
            and a.status == b.status and torch.equal(a.steps, b.steps))


@pytest.mark.slow
def test_concurrent_clients_get_the_direct_calls_results(setup):
    model, x = setup
    ex = Explainer(model, CFG)
    results, errors = {}, []
    start = threading.Barrier(x.shape[0])

    with ExplainerService(ex, max_batch=4, window=0.5) as service:
        def client(i):
            try:
                start.wait()
                fut = service.submit(x[i], seed=3)
                results[fut.request_id] = (i, fut.result(timeout=120))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(x.shape[0])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    batches = list(service.batches)
    assert sum(len(b.ids) for b in batches) == x.shape[0]
    assert max(len(b.ids) for b in batches) > 1, "no request was batched"
    assert all(len(b.ids) <= 4 for b in batches)
    for b in batches:   # each batch is exactly the direct call on the same images, same seed
        images = [results[r][0] for r in b.ids]
        direct = ex(x[images], seed=3)
        for j, r in enumerate(b.ids):
            got = results[r][1]
            assert len(got) == 1 and _same(got, direct.select(j)), (b.ids, j)
    # a different seed gives a different fit: the seed is honoured, not dropped
    assert not torch.equal(ex(x[:1], seed=4).soft_mask, ex(x[:1], seed=3).soft_mask)


def test_one_bad_request_fails_alone(setup):
    model, x = setup
    bad = x[0].clone()
    bad[0, 0, 0] = float("nan")
    with ExplainerService(Explainer(model, CFG), max_batch=4, window=0.5) as service:
        futs = [service.submit(bad)] + [service.submit(x[i]) for i in (1, 2)]
        with pytest.raises(ValueError, match="NaN"):
            futs[0].result(timeout=120)
        good = [f.result(timeout=120) for f in futs[1:]]
    assert all(len(g) == 1 and g.mask.shape == (1, 64, 64) for g in good)


class _Gated(Explainer):
    """An Explainer whose calls wait for ``gate``: holds the worker so the queue fills."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, *a, **k):
        self.entered.set()
        assert self.gate.wait(60)
        return super().__call__(*a, **k)


def test_queue_bound_timeout_and_shutdown(setup):
    model, x = setup
    ex = _Gated(model, CFG)
    service = ExplainerService(ex, max_batch=1, window=0.0, max_queue=2)
    with pytest.raises(ValueError, match="one image"):
        service.submit(x[:2])
    with pytest.raises(ValueError, match="target"):
        service.submit(x[0], target=1.5)
    first = service.submit(x[0])
    assert ex.entered.wait(30)                       # the worker holds the first request
    late = service.submit(x[1], timeout=0.05)        # waits in the queue past its timeout
    queued = service.submit(x[2])
    with pytest.raises(ServiceFull):
        service.submit(x[3])
    time.sleep(0.2)
    ex.gate.set()
    assert len(first.result(timeout=120)) == 1
    with pytest.raises(TimeoutError):
        late.result(timeout=120)
    assert len(queued.result(timeout=120)) == 1
    # close: queued requests are cancelled with cancel_pending, new ones refused
    ex.gate.clear()
    ex.entered.clear()
    held = service.submit(x[0])
    assert ex.entered.wait(30)
    pending = service.submit(x[1])
    closer = threading.Thread(target=service.close, kwargs=dict(cancel_pending=True))
    closer.start()
    time.sleep(0.1)
    with pytest.raises(ServiceClosed):
        service.submit(x[2])
    ex.gate.set()
    closer.join(60)
    assert not closer.is_alive()
    assert len(held.result(timeout=1)) == 1          # a started batch finishes
    assert pending.cancelled()


def test_rejects_what_is_not_an_explainer():
    with pytest.raises(ValueError, match="Explainer"):
        ExplainerService(object())
    with pytest.raises(ValueError, match="max_batch"):
        ExplainerService(Explainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))), max_batch=0)


def test_requests_on_other_devices_are_batched_apart(setup):
    """Two same-shape requests on different devices are two batches, not one torch.stack that
    fails outside the batch's error handling: the bad one fails alone, the worker lives on."""
    model, x = setup
    with ExplainerService(Explainer(model, CFG), max_batch=4, window=0.3) as service:
        good = service.submit(x[0])
        bad = service.submit(x[1].to("meta"))
        assert len(good.result(timeout=120)) == 1
        with pytest.raises(Exception):
            bad.result(timeout=120)
        assert all(len(b.ids) == 1 for b in service.batches)
        assert len(service.submit(x[2]).result(timeout=120)) == 1   # the worker is alive
    assert service.worker_error is None


def test_a_failing_worker_resolves_every_request_and_refuses_new_ones(setup, monkeypatch):
    """Whatever kills the worker, the requests it held and those still queued fail with
    ServiceClosed instead of hanging, and submit refuses from then on."""
    model, x = setup
    ex = _Gated(model, CFG)
    service = ExplainerService(ex, max_batch=1, window=0.0)

    def broken(batch):
        ex.gate.wait(60)
        raise RuntimeError("worker fault")

    monkeypatch.setattr(service, "_serve", broken)
    taken = service.submit(x[0])
    time.sleep(0.3)                       # the worker holds it in the broken _serve
    queued = service.submit(x[1])
    ex.gate.set()
    for fut in (taken, queued):
        with pytest.raises(ServiceClosed, match="worker fault"):
            fut.result(timeout=60)
    service.close()
    assert isinstance(service.worker_error, RuntimeError)
    with pytest.raises(ServiceClosed):
        service.submit(x[2])


def test_submit_racing_close_never_leaves_a_future_unresolved(setup):
    """Clients submitting while the service closes: each submit either raises ServiceClosed or
    returns a Future that resolves (a result or ServiceClosed), none hangs."""
    model, x = setup
    for _ in range(3):
        service = ExplainerService(Explainer(model, CFG.replace(steps=10, fit=dict(min_steps=10))), max_batch=8, window=0.0)
        futures, refused, go = [], [], threading.Event()

        def client(i):
            go.wait()
            for _ in range(3):
                try:
                    futures.append(service.submit(x[i % x.shape[0]]))
                except ServiceClosed:
                    refused.append(i)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        go.set()
        service.close()
        for t in threads:
            t.join(60)
        for fut in futures:
            try:
                fut.result(timeout=120)
            except ServiceClosed:
                pass
        assert len(futures) + len(refused) == 12


def test_a_batch_of_one_is_the_direct_call_on_that_image(setup):
    """With max_batch=1 every request is explained alone: each result is explainer(x_i) itself."""
    model, x = setup
    explainer = Explainer(model, CFG)
    with ExplainerService(explainer, max_batch=1) as service:
        futures = [service.submit(x[i]) for i in range(4)]
        results = [f.result(timeout=300) for f in futures]
    for i, r in enumerate(results):
        assert _same(r, explainer(x[i])), i
