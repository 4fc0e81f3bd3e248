"""An EVAL-X-style judge (Jethani et al. 2021): a copy of the classifier fine-tuned on randomly
masked inputs, so that partial images are in its distribution and a mask's shape alone is not
a cue it learned to read. It scores an explanation's evidence beside the classifier itself.

Recipe (``JudgeRecipe``): start from the classifier's weights; each step takes a batch of the
given images, masks most of them with :class:`~medcam_fast.evaluation.masking.RandomMasking`
(blobs or scattered pixels of a uniform random area, the rest the blank baseline) and fits the
copy's softmax to the *classifier's own* softmax on the whole image (KL): the judge answers
for the classifier, not for the ground truth (EVAL-X fits labels). Adam, constant lr; BatchNorm
statistics adapt to masked inputs.

One judge is one column, not the verdict: Puli et al. 2024 show that no judge alone rules out
that a mask encodes the label in its shape.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..medcam.verify import batched_logits
from .masking import RandomMasking


@dataclass(frozen=True)
class JudgeRecipe:
    steps: int = 200
    batch: int = 32
    lr: float = 1e-4
    masking: RandomMasking = field(default_factory=lambda: RandomMasking(p=0.9, areas=(0.0, 1.0)))
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.steps} steps of {self.batch} images, Adam lr {self.lr}, KL to the classifier's softmax "
                f"on the whole image; masking: {self.masking.describe()}")


def fit_judge(model: torch.nn.Module, images: torch.Tensor, recipe: JudgeRecipe | None = None,
              progress=None) -> torch.nn.Module:
    """A judge for ``model``: a deep copy fine-tuned on ``images`` ``[N,C,H,W]`` (model input space,
    not the images it will judge) under ``recipe``. Returns the judge in eval mode; ``model`` is
    left untouched."""
    recipe = recipe or JudgeRecipe()
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be [N>=2, C, H, W], got {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        teacher = F.softmax(batched_logits(model, images, 64), dim=1)
    model.train(was_training)
    judge = copy.deepcopy(model).train()
    for p in judge.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(judge.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    for step in range(recipe.steps):
        idx = torch.randint(images.shape[0], (min(recipe.batch, images.shape[0]),), generator=gen)
        x = recipe.masking(images[idx], gen)
        loss = F.kl_div(F.log_softmax(judge(x), dim=1), teacher[idx], reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(step, float(loss.detach()))
    return judge.eval().requires_grad_(False)
