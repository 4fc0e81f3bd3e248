"""Training the amortised explainer over a data set with the Med-CAM loss.

Each step explains a batch of training images, most for the label the classifier gives them, a
share (``wrong_rate``) for another class (Dabkowski & Gal 2017): on the first the loss is the
per-image fit's own (:func:`medcam_fast.medcam.fit.fast_loss`: activation matching, KL, the
hinged CE, the priors, and the robustness term over one of the image's certified fills), on the
second only the priors (for both, with the sigmoid's slope: see ``_train_step``), so the network must learn to give a class it does not see nothing, and a
mask cannot pass the sufficiency test by being asked.
"""
from __future__ import annotations

import datetime
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..medcam import MedCAMConfig, sufficiency
from ..medcam.backgrounds import threshold_field
from ..medcam.fit import fast_loss, fit_targets, layer_metrics, prior_loss
from ..medcam.step import straight_through
from ..medcam.unet import auto_scale, resolve_channels_last
from ..models.adapter import FrozenClassifier, traced_or_hooks
from ..medcam.amortised_net import ConditionalUNet
from ..runstate import load_tree, save_tree
from ..medcam.amortised_store import AmortisedExplainer, classifier_fingerprint


@dataclass
class AmortisedRecipe:
    """How an amortised explainer is trained (stored in its card)."""

    steps: int = 2000                # optimiser steps
    batch: int = 16                  # images per step
    lr: float = 1e-3                 # Adam, cosine-decayed to lr_final * lr
    lr_final: float = 0.05
    # share of each batch explained for a class the classifier does not give. 0.5 on the demo's
    # brain_mri run (val 32): wrong labels pass 0.0% (0.25: 3.1%), but status ok 9.4% (0.25: 31.2%)
    wrong_rate: float = 0.25
    # share of the steps with stochastic binarisation thresholds (then 0.5); the trainer's own, not
    # the fit's (config.fit.anneal, 0.6): it spans 2000 steps over many images, not one image's fit
    anneal: float = 0.3
    widths: tuple[int, ...] = (16, 32, 64, 128)   # conditional on the class: wider than the fit's U-Net
    # None: the per-image fit's (config.fit.unet_scale, init_bias, standardise, offset_lr_scale),
    # filled in by :meth:`resolved`, so the card holds the values used
    scale: int | None = None         # 0: a grid of at most 64 px a side
    init_bias: float | None = None
    standardise: float | None = None  # logits = s * standardised map + offset, as the per-image U-Net
    offset_lr_scale: float | None = None  # learning-rate factor of the offset's parameters
    checkpoint_every: int = 100
    seed: int = 0

    def resolved(self, config: MedCAMConfig) -> "AmortisedRecipe":
        """This recipe with every None taken from ``config.fit``: one source of truth per default."""
        fit = config.fit
        inherited = {"scale": fit.unet_scale, "init_bias": fit.init_bias, "standardise": fit.standardise,
                     "offset_lr_scale": fit.offset_lr_scale}
        return replace(self, **{k: v for k, v in inherited.items() if getattr(self, k) is None})

    def validate(self) -> "AmortisedRecipe":
        if self.steps < 1 or self.batch < 2 or self.checkpoint_every < 1:
            raise ValueError("recipe steps >= 1, batch >= 2 and checkpoint_every >= 1 needed")
        if not 0 <= self.wrong_rate < 1 or not 0 <= self.anneal <= 1 or self.lr <= 0:
            raise ValueError("wrong_rate in [0, 1), anneal in [0, 1] and lr > 0 needed")
        return self


@torch.no_grad()
def _labels_and_fills(fwd, images: torch.Tensor, cfg: MedCAMConfig, device, chunk: int = 64):
    """The classifier's label ``[M]`` of every training image and which fills are certified for
    it ``[M,F]`` (computed once: the fills are functions of the image alone)."""
    labels, certified = [], []
    for s in range(0, images.shape[0], chunk):
        x = images[s:s + chunk].to(device)
        y = fwd(x).argmax(1)
        fills = sufficiency.certify(fwd, x, y, cfg.fills, cfg.baseline, cfg.checks.certify_margin, cfg.max_batch)
        labels.append(y.cpu())
        certified.append(fills.certified.cpu())
    return torch.cat(labels), torch.cat(certified)


def _pick_fill(certified: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``[B]``: one fill per image, uniform over its certified ones (over all where none is)."""
    weights = torch.where(certified.any(1, keepdim=True), certified.float(), torch.ones_like(certified, dtype=torch.float))
    return torch.multinomial(weights, 1, generator=gen)[:, 0]


def _lr_factor(recipe: AmortisedRecipe):
    return lambda step: recipe.lr_final + (1 - recipe.lr_final) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))


def train_explainer(model: torch.nn.Module, images: torch.Tensor, config: MedCAMConfig | None = None,
                    recipe: AmortisedRecipe | None = None, checkpoint=None, progress: bool = True,
                    card: dict | None = None) -> AmortisedExplainer:
    """Trains a :class:`ConditionalUNet` to explain ``model`` on ``images`` ``[M,C,H,W]``
    (preprocessed as the model expects; kept on the CPU, batches move to the model's device).

    Args:
        config: the Med-CAM loss and fills (default :class:`MedCAMConfig`); stored in the card,
            and what the explainer's masks are then checked with.
        recipe: :class:`AmortisedRecipe`.
        checkpoint: a file to save the state to every ``recipe.checkpoint_every`` steps; when it
            exists, training resumes from it (it must come from the same classifier and recipe).
        progress: a tqdm bar with the running loss and mask areas.
        card: facts to store in the card (data, classifier name, command, ...).

    Returns:
        :class:`AmortisedExplainer` with its card (``recipe``, ``config``, ``classifier``
        fingerprint, ``input_shape``, ``training`` with the loss history).
    """
    cfg = (config or MedCAMConfig()).validate()
    recipe = (recipe or AmortisedRecipe()).resolved(cfg).validate()
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[0] < 2 or not images.is_floating_point():
        raise ValueError("images must be a float tensor [M,C,H,W] with M >= 2")
    start = time.perf_counter()
    clf = FrozenClassifier(model, cfg.fit.layers, cfg.fit.layer_weights)
    device = clf.device
    clf.prepare(images[:1].to(device))
    fingerprint = classifier_fingerprint(model)
    m_count, c, h, w = images.shape
    gen = torch.Generator().manual_seed(recipe.seed)
    channels_last = resolve_channels_last(cfg, device)
    with clf.session(channels_last=channels_last):
        view = traced_or_hooks(clf, images[:2].to(device), channels_last)
        fwd = lambda x: view.forward(x)  # noqa: E731
        labels, certified = _labels_and_fills(fwd, images, cfg, device)
        k = int(fwd(images[:1].to(device)).shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            net = ConditionalUNet(c, k, recipe.widths, recipe.scale or auto_scale((h, w)), recipe.init_bias,
                                  recipe.standardise, cfg.fit.std_floor)
        net = net.to(device).train()
        offset = {id(p) for p in net.offset_parameters()}
        opt = torch.optim.Adam([{"params": [p for p in net.parameters() if id(p) not in offset]},
                                {"params": net.offset_parameters(), "lr": recipe.lr * recipe.offset_lr_scale}],
                               lr=recipe.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(recipe))
        history, step0, earlier = [], 0, 0.0   # earlier: seconds of the runs before a resume
        ckpt = Path(checkpoint) if checkpoint is not None else None
        if ckpt is not None and ckpt.is_file():
            try:   # safetensors and JSON: nothing is unpickled
                state = load_tree(ckpt, device)
            except ValueError as exc:
                raise ValueError(f"checkpoint {str(ckpt)!r} cannot be read as a training checkpoint ({exc}); "
                                 "remove it or pass another --checkpoint") from exc
            state["gen"] = state["gen"].cpu()
            if state["fingerprint"] != fingerprint or state["recipe"] != asdict(recipe) \
                    or state["input_shape"] != [c, h, w]:
                raise ValueError(f"checkpoint {str(ckpt)!r} is of another classifier, recipe or input shape; "
                                 "remove it or pass another --checkpoint")
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            history, step0, earlier = state["history"], state["step"], state.get("seconds", 0.0)
        metrics = layer_metrics(cfg, len(clf.layers))
        bar = _bar(recipe.steps, step0, progress)
        running = None
        for step in range(step0, recipe.steps):
            stats = _train_step(net, view, opt, images, labels, certified, cfg, recipe, metrics, gen, step, k, device)
            sched.step()
            running = stats if running is None else {key: 0.95 * running[key] + 0.05 * v for key, v in stats.items()}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running['loss']:.3f}", area=f"{running['area']:.1%}",
                                wrong_area=f"{running['wrong_area']:.1%}", held=f"{running['held']:.0%}")
            if (step + 1) % 50 == 0 or step + 1 == recipe.steps:
                history.append({"step": step + 1, **{key: round(v, 5) for key, v in running.items()}})
            if ckpt is not None and ((step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps):
                save_tree(ckpt, {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                 "gen": gen.get_state(), "history": history, "step": step + 1,
                                 "fingerprint": fingerprint, "recipe": asdict(recipe), "input_shape": [c, h, w],
                                 "seconds": earlier + time.perf_counter() - start})   # atomic: a kill leaves no half
        if bar is not None:
            bar.close()
    net.eval()
    card = dict(card or {})
    card["classifier"] = {**card.get("classifier", {}), "fingerprint": fingerprint}
    card.update({
        "input_shape": [c, h, w], "num_classes": k, "recipe": asdict(recipe), "config": cfg.to_dict(),
        "training": {**card.get("training", {}), "images": m_count, "seconds": round(earlier + time.perf_counter() - start, 1),
                     "resumed_from_step": step0, "history": history, "machine": f"{platform.machine()} "
                     f"{platform.processor() or ''}".strip(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "date": datetime.date.today().isoformat()},
    })
    return AmortisedExplainer(net, card)


def _bar(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, desc="train-explainer")


def _train_step(net, view, opt, images, labels, certified, cfg, recipe, metrics, gen, step, k, device) -> dict:
    """One optimiser step on a random batch; returns running statistics (floats). The batch's
    split into right and wrong labels is drawn on the CPU and indexes by position, so the step
    reads one tensor back from the device (the statistics), not one per branch."""
    b = recipe.batch
    idx = torch.randint(images.shape[0], (b,), generator=gen)
    x = images[idx].to(device)
    y = labels[idx].to(device)
    wrong_cpu = torch.rand(b, generator=gen) < recipe.wrong_rate
    wrong = wrong_cpu.to(device)
    shift = torch.randint(1, k, (b,), generator=gen).to(device)
    target = torch.where(wrong, (y + shift) % k, y)
    fill_idx = _pick_fill(certified[idx], gen)
    noise = torch.rand((1, 1, *x.shape[2:]), generator=gen).to(device, x.dtype)
    progress = torch.tensor([step / recipe.steps], device=device, dtype=x.dtype)
    thresholds = threshold_field(noise, progress, cfg.fit.threshold, recipe.anneal)   # [1,1,H,W]
    ri_cpu, wi_cpu = (~wrong_cpu).nonzero()[:, 0], wrong_cpu.nonzero()[:, 0]
    ri, wi = ri_cpu.to(device), wi_cpu.to(device)

    mask_logits = net(x, target)
    _, m = straight_through(mask_logits, cfg, thresholds if cfg.fit.binarize == "stochastic" else None)
    loss = torch.zeros((), device=device)
    held = torch.zeros((), device=device)
    if ri_cpu.numel():
        xr, yr = x[ri], y[ri]
        with torch.no_grad():
            logits_x, feats_x = view.forward(xr, with_activations=True)
        fills = sufficiency.fill_images(xr, cfg.fills, cfg.baseline)
        background = fills[torch.arange(xr.shape[0], device=device), fill_idx[ri_cpu].to(device)]
        tl, tf, ts, tc = fit_targets(logits_x, feats_x, yr)
        # a channel silent on x would weigh 1e6x in the channel-normalised MSE: harmless for one
        # image's own Adam fit, it swamps a batch's gradient, so it is floored at 10% of the mean
        ts = [torch.maximum(sc, 0.1 * sc.mean(1, keepdim=True)) for sc in ts]
        per, _, ok = fast_loss(view, xr, yr, m[ri], mask_logits[ri], [background], (tl, tf, ts, tc),
                               cfg.replace(priors=dict(lambda_min=0.0)), metrics)
        loss = loss + per.sum()
        held = ok.float().mean()
    # the priors with the sigmoid's own slope: the fit's constant slope never fades, and over
    # thousands of steps it drove every logit to -inf (the fit stops after 150)
    loss = loss + prior_loss(mask_logits, cfg.replace(fit=dict(st_slope=0.0))).sum()
    opt.zero_grad(set_to_none=True)
    (loss / b).backward()
    opt.step()
    with torch.no_grad():
        area = (mask_logits.detach() > 0).flatten(1).float().mean(1)
        zero = area.new_zeros(())
        stats = torch.stack([loss.detach() / b, area[ri].mean() if ri_cpu.numel() else zero,
                             area[wi].mean() if wi_cpu.numel() else zero, held.to(area.dtype)]).tolist()
        return dict(zip(("loss", "area", "wrong_area", "held"), stats))
