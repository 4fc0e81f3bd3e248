"""ExplainerService: concurrent clients get the results of the batched calls the service made,
one bad request fails alone, and the queue bound, the timeout and the shutdown behave."""
import threading
import time

import pytest
import torch

from medcam_fast import Explainer, MedCAMConfig
from medcam_fast.medcam.service import ExplainerService, ServiceClosed, ServiceFull

from planted import make_planted, train_tiny_cnn

CFG = MedCAMConfig(steps=20, min_steps=10, check_every=10, n_random=4)


@pytest.fixture(scope="module")
def setup():
    model = train_tiny_cnn(seed=0)
    x, _, _ = make_planted(6, seed=31, positive_only=True)
    return model, x


def _same(a, b):
    return (torch.equal(a.mask, b.mask) and torch.equal(a.soft_mask, b.soft_mask) and torch.equal(a.label, b.label)
            and a.status == b.status and torch.equal(a.steps, b.steps))


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
