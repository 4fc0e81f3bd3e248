"""Counterfactual backgrounds: images x' whose own label differs from the explained one.

Sources, in order: the other images of the batch and a user-given reference set; their
horizontal flips when fewer than ``n_robust`` qualify; then synthetic backgrounds of the usual
kinds whose own (null) label differs. Labels come from the classifier itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backgrounds import _KINDS, constant_like
from .verify import batched_logits


@dataclass
class CounterfactualPool:
    """Pool images ``[P,C,H,W]`` with their labels ``[P]``; per image, the pool indices it may use
    for training draws and the ``[K,C,H,W]`` verification backgrounds (as indices ``[N,K]``)."""

    images: torch.Tensor
    labels: torch.Tensor
    train_eligible: list[torch.Tensor]
    verify_index: torch.Tensor | None
    description: str

    def verify_backgrounds(self, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[N,K,C,H,W]`` verification backgrounds (of images ``rows``, default all)."""
        if self.verify_index is None:
            return None
        idx = self.verify_index if rows is None else self.verify_index[rows]
        return self.images[idx.to(self.images.device)]


def _synthetic(x: torch.Tensor, seed: int, draws: int = 2) -> torch.Tensor:
    gen = torch.Generator(device=x.device).manual_seed(int(seed) + 7)
    out = []
    for xi in x:
        for kind in ("gaussian", "uniform", "blur", "shuffle"):
            for _ in range(draws if kind != "blur" else 1):
                out.append(_KINDS[kind](xi, gen))
        for v in (-1.0, 1.0):
            out.append(constant_like(xi, v))
    return torch.stack(out)


@torch.no_grad()
def build_pool(forward, x, label, reference, n_robust: int, seed: int, batch_size: int,
               use_batch: bool = True) -> CounterfactualPool:
    """Collects the counterfactual pool for images ``x`` ``[N,C,H,W]`` with labels ``label`` ``[N]``.

    ``use_batch``: the batch's own images join the pool (each image never draws itself).
    Verification and training backgrounds are disjoint where an image has at least
    ``2 * n_robust`` eligible ones; otherwise both use all of them (the description says so).
    """
    n = x.shape[0]
    parts, sources = ([x], [f"{n} batch image(s)"]) if use_batch else ([], [])
    if reference is not None:
        parts.append(reference.to(x.device, x.dtype))
        sources.append(f"{reference.shape[0]} reference image(s)")
    images = torch.cat(parts) if parts else x[:0]
    labels = (batched_logits(forward, images, batch_size).argmax(1) if images.shape[0]
              else torch.empty(0, dtype=torch.long, device=x.device))
    # pool index of each batch image (-1: not an image of this batch), so an image never draws itself
    own = torch.arange(images.shape[0], device=x.device) if use_batch else \
        torch.full((images.shape[0],), -1, device=x.device)

    def counts(lab):
        return torch.stack([(lab != label[i]).sum() for i in range(n)])

    if images.shape[0] > 0 and int(counts(labels).min()) < n_robust:
        flips = images.flip(-1)
        images = torch.cat([images, flips])
        labels = torch.cat([labels, batched_logits(forward, flips, batch_size).argmax(1)])
        own = torch.cat([own, own])
        sources.append("their horizontal flips")
    if int(counts(labels).min()) < n_robust:
        synth = _synthetic(x, seed)
        images = torch.cat([images, synth])
        labels = torch.cat([labels, batched_logits(forward, synth, batch_size).argmax(1)])
        own = torch.cat([own, torch.full((synth.shape[0],), -1, device=x.device)])
        sources.append("synthetic gaussian/uniform/blur/shuffle/constant backgrounds")

    gen = torch.Generator().manual_seed(int(seed) + 13)
    train, verify, few = [], [], 0
    for i in range(n):
        ok = ((labels != label[i]) & (own != i)).nonzero().flatten().cpu()
        if ok.numel() == 0:
            train.append(ok)
            verify.append(None)
            continue
        ok = ok[torch.randperm(ok.numel(), generator=gen)]
        if ok.numel() >= 2 * n_robust:
            verify.append(ok[:n_robust])
            train.append(ok[n_robust:])
        else:
            few += ok.numel() < n_robust
            verify.append(ok[torch.arange(n_robust) % ok.numel()])
            train.append(ok)
    missing = sum(v is None for v in verify)
    verify_index = None
    if missing < n:
        verify_index = torch.stack([v if v is not None else torch.zeros(n_robust, dtype=torch.long) for v in verify])
    desc = "counterfactual backgrounds from " + ", ".join(sources)
    if missing:
        desc += f"; {missing} image(s) had none with another label"
    if few:
        desc += f"; {few} image(s) had fewer than {n_robust} distinct (repeated)"
    pool = CounterfactualPool(images, labels, train, verify_index, desc)
    pool.missing = torch.tensor([v is None for v in verify])
    return pool
