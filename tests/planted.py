"""Synthetic planted-evidence data and a tiny CNN trained on it in seconds (for explain tests).

Class 1 images hold one filled 7x7 square at a random position; class 0 images do not. Both
carry gaussian noise and three bright bar distractors, so the square alone decides the class.
"""
import functools

import torch
from torch import nn
import torch.nn.functional as F

SQUARE = 7


def make_planted(n: int, size: int = 64, seed: int = 0, positive_only: bool = False):
    """Returns x ``[n,1,size,size]``, labels ``[n]`` and planted masks ``[n,size,size]`` (empty for class 0)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    labels = torch.ones(n, dtype=torch.long) if positive_only else torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        for _ in range(3):  # bars: 1x9 or 9x1
            r, c = torch.randint(2, size - 11, (2,), generator=g).tolist()
            if torch.rand(1, generator=g) < 0.5:
                x[i, 0, r, c:c + 9] = 1.0
            else:
                x[i, 0, r:r + 9, c] = 1.0
        if labels[i] == 1:
            r, c = torch.randint(2, size - SQUARE - 2, (2,), generator=g).tolist()
            x[i, 0, r:r + SQUARE, c:c + SQUARE] = 1.0
            masks[i, r:r + SQUARE, c:c + SQUARE] = True
    return x, labels, masks


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


def _train(seed: int, data, epochs: int, inputs=None) -> dict:
    """The weights of :func:`tiny_cnn` trained on ``data()`` -> (x, y) for ``epochs``, each batch
    passed through ``inputs()`` (a transform made after the data, or none); the global RNG is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_cnn()
        x, y = data()
        transform = inputs() if inputs is not None else (lambda xb: xb)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0])
            for i in range(0, x.shape[0], 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(transform(x[idx])), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def tiny_cnn_state(seed: int = 0, n: int = 1024, epochs: int = 4) -> dict:
    """The weights of :func:`tiny_cnn` trained on :func:`make_planted`: trained once per test
    session (per process) and per arguments."""
    return _train(seed, lambda: make_planted(n, seed=seed + 100)[:2], epochs)


def train_tiny_cnn(seed: int = 0, n: int = 1024, epochs: int = 4) -> nn.Module:
    """A fresh :func:`tiny_cnn` (in eval mode) with the session's cached trained weights."""
    model = tiny_cnn()
    model.load_state_dict(tiny_cnn_state(seed, n, epochs))
    return model.eval()


class CornerClassifier(nn.Module):
    """Class 1 when the mean of the top-left 4x4 block exceeds 0.5, by construction; ``calls``
    counts the images it has seen."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        s = x[:, 0, :4, :4].mean(dim=(1, 2)) - 0.5
        return torch.stack([-s, s], dim=1) * 10


TAG_VALUE = 2.0  # brighter than any background pixel


def make_tagged(n: int, size: int = 64, seed: int = 0):
    """Planted shortcut data: smooth random backgrounds; class 1 carries the "L" tag of
    :mod:`medcam_fast.data.tags` near the border, class 0 none. Returns x ``[n,1,size,size]``
    and labels ``[n]``."""
    from medcam_fast.data.tags import draw_tags, tag_positions
    from medcam_fast.evaluation.masking import blob_scores

    g = torch.Generator().manual_seed(seed)
    x = (0.4 * blob_scores(n, (size, size), g) + 0.2 * torch.randn(n, size, size, generator=g))[:, None]
    x = x.clamp(-1, 1)
    labels = torch.randint(0, 2, (n,), generator=g)
    on = (labels == 1).nonzero().flatten()
    x[on] = draw_tags(x[on], tag_positions(on.numel(), size, g), TAG_VALUE)[0]
    return x, labels


@functools.lru_cache(maxsize=None)
def _tag_cnn_state(seed: int, n: int, epochs: int) -> dict:
    from medcam_fast.evaluation.masking import RandomMasking

    def masked():
        masking, g = RandomMasking(p=0.5), torch.Generator().manual_seed(seed)
        return lambda xb: masking(xb, g)

    return _train(seed, lambda: make_tagged(n, seed=seed + 200), epochs, masked)


def train_tag_cnn(seed: int = 0, n: int = 1024, epochs: int = 8) -> nn.Module:
    """The tiny CNN trained on :func:`make_tagged` with EVAL-X-style random masking (half the
    images keep only random blobs or pixels, the rest 0), so that partial images are in
    distribution; trained once per session, a fresh model per call."""
    model = tiny_cnn()
    model.load_state_dict(_tag_cnn_state(seed, n, epochs))
    return model.eval()


MARK_VALUE = 2.0      # the planted mark's intensity: brighter than anything else in make_two_cue images
MARK_PIXELS = 24      # mark pixels that make the mark cue 1: about half the "L" tag at 64² (45 px)
LESION_SIDE = 16


def make_two_cue(n: int, size: int = 64, seed: int = 0):
    """Images for :class:`TwoCueClassifier`: smooth dim backgrounds (|x| < 0.6) each holding one
    "lesion", a ``LESION_SIDE`` checkerboard of amplitude 0.5 at a random place away from the
    border (where marks go). Returns x ``[n,1,size,size]`` and lesion masks ``[n,size,size]``."""
    from medcam_fast.evaluation.masking import blob_scores

    g = torch.Generator().manual_seed(seed)
    x = (0.25 * blob_scores(n, (size, size), g)).clamp(-0.3, 0.3)[:, None]
    lesion = torch.zeros(n, size, size, dtype=torch.bool)
    ii = torch.arange(LESION_SIDE)
    checker = 0.5 * (1 - 2 * ((ii[:, None] + ii[None, :]) % 2)).float()
    lo, hi = size // 4, size - size // 4 - LESION_SIDE
    for i in range(n):
        r, c = torch.randint(lo, hi + 1, (2,), generator=g).tolist()
        x[i, 0, r:r + LESION_SIDE, c:c + LESION_SIDE] += checker
        lesion[i, r:r + LESION_SIDE, c:c + LESION_SIDE] = True
    return x, lesion


class TwoCueClassifier(nn.Module):
    """A hand-set two-class classifier with a known answer (no training).

    Two cues, each in [0, 1]: ``mark`` (pixels above 1.5, the planted mark of intensity MARK_VALUE,
    counted: MARK_PIXELS of them make 1, so a blob that grazes the mark does not carry it) and ``lesion`` (period-2 checkerboard texture, which straight edges, blurs and flat
    fills do not have: a 2x2 [[1,-1],[-1,1]] filter above 1, counted). The class-1 margin is
    ``8 * mark + 8 * lesion - 12`` when ``needs_lesion`` (the mark flips a lesion image to class 1
    and is necessary, but alone it is not sufficient), else ``8 * mark - 4`` (the mark alone
    decides: sufficient and necessary)."""

    def __init__(self, needs_lesion: bool = True):
        super().__init__()
        self.needs_lesion = needs_lesion
        self.checker = nn.Conv2d(1, 1, 2, bias=False)
        with torch.no_grad():
            self.checker.weight.copy_(torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]]]]))
        self.checker.requires_grad_(False)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            w = 8.0 if needs_lesion else 0.0
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [8.0, w]]))
            self.head.bias.copy_(torch.tensor([0.0, -12.0 if needs_lesion else -4.0]))
        self.head.requires_grad_(False)

    def forward(self, x):
        mark = (2 * F.relu(x - 1.5).sum(dim=(1, 2, 3)) / MARK_PIXELS).clamp(max=1)
        texture = F.relu(self.checker(x.clamp(-1, 1)).abs() - 1).sum(dim=(1, 2, 3))
        lesion = (texture / 40).clamp(max=1)
        return self.head(torch.stack([mark, lesion], 1))
