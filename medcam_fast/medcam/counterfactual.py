"""Counterfactual backgrounds: images x' whose own label differs from the explained one.

Sources, in tiers chosen per image: the other images of the batch and a user-given reference set;
their horizontal flips when fewer than ``n_robust`` qualify; then the image's own synthetic
backgrounds whose (null) label differs. Labels come from the classifier itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backgrounds import _KINDS, constant_like
from .verify import batched_logits


@dataclass
class CounterfactualPool:
    """Pool images ``[P,C,H,W]`` with their labels ``[P]``; per image, the pool indices it may use
    for training draws and the ``[K,C,H,W]`` verification backgrounds (as indices ``[N,K]``; the
    rows of ``missing`` images are placeholders and must not be used)."""

    images: torch.Tensor
    labels: torch.Tensor
    train_eligible: list[torch.Tensor]
    verify_index: torch.Tensor | None
    description: str
    missing: torch.Tensor            # [N] bool: images with no background of another label (untestable)

    def verify_backgrounds(self, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[N,K,C,H,W]`` verification backgrounds (of images ``rows``, default all)."""
        if self.verify_index is None:
            return None
        idx = self.verify_index if rows is None else self.verify_index[rows]
        return self.images[idx.to(self.images.device)]


def _synthetic(xi: torch.Tensor, seed: int, draws: int = 2) -> torch.Tensor:
    """``[9,C,H,W]`` synthetic backgrounds of one image ``[C,H,W]``, from a stream of its own."""
    gen = torch.Generator(device=xi.device).manual_seed(int(seed) + 7)
    out = []
    for kind in ("gaussian", "uniform", "blur", "shuffle"):
        for _ in range(draws if kind != "blur" else 1):
            out.append(_KINDS[kind](xi[None], gen)[0])
    for v in (-1.0, 1.0):
        out.append(constant_like(xi, v))
    return torch.stack(out)


@torch.no_grad()
def build_pool(forward, x, label, reference, n_robust: int, seed: int, batch_size: int,
               use_batch: bool = True) -> CounterfactualPool:
    """Collects the counterfactual pool for images ``x`` ``[N,C,H,W]`` with labels ``label`` ``[N]``.

    Sources, by tier: the batch's own images (``use_batch``; an image never draws itself) and
    ``reference``; their horizontal flips, for an image with fewer than ``n_robust`` eligible so far;
    then the image's own synthetic backgrounds, if still fewer. Tiers are chosen per image and
    synthetic backgrounds are private to their image, so without ``use_batch`` an image gets the
    same backgrounds alone or in any batch. Verification and training backgrounds are disjoint: of
    an image's E eligible backgrounds, verification takes min(n_robust, E // 2) (repeated
    cyclically to ``n_robust`` when fewer) and training the rest; only an image with a single one
    uses it for both (the description says so).
    """
    n, dev = x.shape[0], x.device
    parts, sources = ([x], [f"{n} batch image(s)"]) if use_batch else ([], [])
    if reference is not None:
        parts.append(reference.to(dev, x.dtype))
        sources.append(f"{reference.shape[0]} reference image(s)")
    images = torch.cat(parts) if parts else x[:0]
    # per pool image: the batch image it is (or is the flip of; -1 none), its tier, and the one
    # image allowed to draw it (-1: any)
    own = torch.arange(images.shape[0], device=dev) if use_batch else torch.full((images.shape[0],), -1, device=dev)
    own[n if use_batch else 0:] = -1
    tier = torch.zeros(images.shape[0], dtype=torch.long, device=dev)
    private = torch.full((images.shape[0],), -1, device=dev)
    if images.shape[0]:
        flips = images.flip(-1)
        images, own = torch.cat([images, flips]), torch.cat([own, own])
        tier, private = torch.cat([tier, torch.ones_like(tier)]), torch.cat([private, private])
    synth = [_synthetic(xi, seed) for xi in x]
    images = torch.cat([images, *synth])
    own = torch.cat([own, torch.full((9 * n,), -1, device=dev)])
    tier = torch.cat([tier, torch.full((9 * n,), 2, device=dev)])
    private = torch.cat([private, torch.arange(n, device=dev).repeat_interleave(9)])
    labels = batched_logits(forward, images, batch_size).argmax(1)

    train, verify, few, shared, used = [], [], 0, 0, set()
    for i in range(n):
        base = (labels != label[i]) & (own != i) & ((private == -1) | (private == i))
        for t in range(3):  # the lowest tier that gives n_robust, else all three
            ok = (base & (tier <= t)).nonzero().flatten().cpu()
            if ok.numel() >= n_robust:
                break
        used.update(tier[ok.to(dev)].tolist())
        if ok.numel() == 0:
            train.append(ok)
            verify.append(None)
            continue
        # the image's own stream: the same permutation alone or in a batch
        ok = ok[torch.randperm(ok.numel(), generator=torch.Generator().manual_seed(int(seed) + 13))]
        if ok.numel() == 1:  # one background only: both use it
            few += 1
            shared += 1
            verify.append(ok[torch.zeros(n_robust, dtype=torch.long)])
            train.append(ok)
            continue
        v = min(n_robust, ok.numel() // 2)   # disjoint: verification never sees a training background
        few += v < n_robust
        verify.append(ok[:v][torch.arange(n_robust) % v])
        train.append(ok[v:])
    sources += [name for t, name in ((1, "their horizontal flips"),
                                     (2, "synthetic gaussian/uniform/blur/shuffle/constant backgrounds"))
                if t in used]
    missing = sum(v is None for v in verify)
    verify_index = None
    if missing < n:
        verify_index = torch.stack([v if v is not None else torch.zeros(n_robust, dtype=torch.long) for v in verify])
    desc = "counterfactual backgrounds from " + ", ".join(sources or ["nothing"])
    if missing:
        desc += f"; {missing} image(s) had none with another label"
    if few:
        desc += f"; {few} image(s) had fewer than {n_robust} distinct verification backgrounds (repeated)"
    if shared:
        desc += f"; {shared} image(s) had one only, used for training and verification alike"
    return CounterfactualPool(images, labels, train, verify_index, desc, torch.tensor([v is None for v in verify]))
