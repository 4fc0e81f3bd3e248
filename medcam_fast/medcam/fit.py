"""The Med-CAM fit loops: ``fit_fast`` (batched, early-stopping) and ``fit_paper`` (the authors'
procedure, slow and faithful). Both return the final mask logits of every image."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from . import losses
from .backgrounds import BackgroundSampler
from .config import MedCAMConfig
from .step import FitStep, resolve_compile, resolve_finished, straight_through
from .unet import StackedAdam, StackedUNet


@dataclass
class FitResult:
    """Per image: mask logits ``[N,1,H,W]`` (soft mask = sigmoid(logits / T)) and steps ``[N]``."""

    logits: torch.Tensor
    steps: torch.Tensor


def use_amp(cfg: MedCAMConfig, x: torch.Tensor) -> bool:
    """bf16 autocast for the classifier pass: ``cfg.amp`` True/False, or None = on CUDA only
    (on CPUs without AVX512-BF16 bf16 is 14-40x slower, measured)."""
    return bool(cfg.amp) if cfg.amp is not None else x.is_cuda


def layer_metrics(cfg: MedCAMConfig, n_layers: int) -> list[str]:
    if cfg.fit.am_metric == "paper":  # cosine on the two shallow layers, channel-normalised MSE deeper
        return ["cosine" if i < 2 else "mse" for i in range(n_layers)]
    return [cfg.fit.am_metric] * n_layers


def compose_all(x, m, baseline, backgrounds: list[torch.Tensor]) -> torch.Tensor:
    """``[(1+K)N,C,H,W]``: e, then e~ for each of the K backgrounds, all through the fused op
    (a second call takes two backgrounds at once: one as its "baseline", one as its background)."""
    parts = [ops.compose(x, m, baseline, backgrounds[0])]
    rest = backgrounds[1:]
    for i in range(0, len(rest) - 1, 2):
        parts.append(ops.compose(x, m, rest[i], rest[i + 1]))
    if len(rest) % 2:
        parts.append(ops.compose(x, m, rest[-1], rest[-1])[: x.shape[0]])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def prior_loss(mask_logits: torch.Tensor, cfg: MedCAMConfig) -> torch.Tensor:
    """``[N]``: lambda_min * (area * |m|1 + bin * |m - m^2|1 + tv * TV) of the soft masks of
    ``mask_logits`` ``[N,1,H,W]`` (the fused op)."""
    if cfg.fit.st_slope > 0:
        # the priors see the soft mask with the same constant slope as the ST mask: pushes up and
        # down then have equal footing (a vanishing sigmoid slope only on one side lets logits run away)
        soft = torch.sigmoid(mask_logits / cfg.fit.mask_temperature)
        lin = mask_logits * (cfg.fit.st_slope / cfg.fit.mask_temperature)
        pri = ops.mask_priors((lin - lin.detach()) + soft.detach(), diagonal=cfg.priors.tv_diagonal)
    else:
        pri = losses.mask_priors(mask_logits, cfg.fit.mask_temperature, cfg.priors.tv_diagonal)
    p = cfg.priors
    return p.lambda_min * (p.area_weight * pri[:, 0] + p.bin * pri[:, 1] + p.tv * pri[:, 2])


def fast_loss(clf, x, label, m, mask_logits, backgrounds, targets, cfg: MedCAMConfig, metrics):
    """Per-image loss ``[N]``, the evidence logits, and whether the objective held at this step
    ``[N]`` bool, from one classifier pass over [e; e~_1 .. e~_K; d].

    e = m*x + (1-m)*baseline carries the keep terms (AM, KL, CE); e~ = m*x + (1-m)*r the
    robustness term; d = (1-m)*x + m*r the deletion term (``cfg.objective`` "deletion" or "dual").
    ``targets`` = (logits ``[N,K]``, features, their channel RMS, the input's label CE ``[N]``):
    per-image constants, computed once (:func:`fit_targets`).
    """
    target_logits, target_feats, target_scales, target_ce = targets
    n = x.shape[0]
    preserve = cfg.objective in ("preservation", "dual")
    delete = cfg.objective in ("deletion", "dual")
    parts = [compose_all(x, m, cfg.baseline, backgrounds)]
    if delete:
        parts.append(ops.compose(x, 1 - m, backgrounds[0], backgrounds[0])[:n])
    batch = torch.cat(parts) if delete else parts[0]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp(cfg, x)):
        logits, feats = clf.forward(batch, with_activations=True)
    logits, feats = logits.float(), [f.float() for f in feats]  # losses in fp32
    k = len(backgrounds)
    out_e, out_r = logits[:n], logits[n:n * (1 + k)]
    label_r = label.repeat(k)
    am = losses.activation_matching([f[:n] for f in feats], target_feats, target_scales, clf.weights, metrics)
    if cfg.fit.ce_mode == "hinge":
        # e: as confident as x (up to p = keep_prob); e~: p(label) >= keep_prob under the fills
        floor = -math.log(cfg.fit.keep_prob)
        ce_e = losses.label_ce_hinge(out_e, label, target_ce.clamp(max=floor))
        ce_r = losses.label_ce_hinge(out_r, label_r, floor)
    else:
        ce_e = losses.label_ce(out_e, label, cfg.fit.ce_temperature)
        ce_r = losses.label_ce(out_r, label_r, cfg.fit.ce_temperature)
    ce_r = ce_r.view(k, n).mean(0)
    kl = losses.kl_to_input(out_e, target_logits, cfg.fit.kl_temperature)
    keep = cfg.fit.act * am + cfg.fit.kl * kl + cfg.fit.ce * ce_e
    loss = prior_loss(mask_logits, cfg)
    held = torch.ones(n, dtype=torch.bool, device=x.device)
    if preserve:
        loss = loss + cfg.fit.lambda_am * keep + cfg.fit.lambda_rob * cfg.fit.rob * ce_r
        held = (out_e.detach().argmax(1) == label) & \
            (out_r.detach().argmax(1) == label_r).view(k, n).all(0)
    if delete:
        out_d = logits[n * (1 + k):]
        log_p = torch.log_softmax(out_d, 1).gather(1, label[:, None])[:, 0]
        loss = loss + cfg.fit.dele * torch.relu(log_p - math.log(cfg.fit.del_prob))
        held = held & (out_d.detach().argmax(1) != label)
    return loss, out_e.detach(), held


def fit_targets(logits_x, feats_x, label) -> tuple:
    """The per-image constants of the loss: (logits ``[N,K]``, features, their channel RMS
    ``[N,C,1,1]``, the label's CE on x ``[N]``), detached."""
    logits_x = logits_x.detach()
    feats = [f.detach() for f in feats_x]
    return (logits_x, feats, [losses.channel_rms(f) for f in feats], losses.label_ce(logits_x, label))


def _select_targets(targets, keep):
    tl, tf, ts, tc = targets
    return tl[keep], [f[keep] for f in tf], [s[keep] for s in ts], tc[keep]


def fit_fast(clf, x, label, targets, sampler: BackgroundSampler, cfg: MedCAMConfig, seed: int,
             step_clf=None, base: torch.Tensor | None = None) -> FitResult:
    """Fits one light U-Net per image, all at once; each image stops on its own.

    An image stops when, at ``patience`` checks in a row (one every ``check_every`` steps), its
    objective held at every step of the window (the binary evidence and its composites kept the
    label; with deletion, the label lost without the mask) and its
    loss summed over the window changed by less than ``plateau`` (relative) from the window before
    (windows have ``check_every`` steps each, so this is the relative change of the mean too).
    A finished image leaves the batch ("drop") or is masked out of the update ("mask", static
    shapes; ``cfg.fit.finished``). The host syncs only at checks. ``targets``: :func:`fit_targets`;
    ``step_clf``: the classifier view of the gradient pass (default ``clf``; a traceable one when
    compiled). ``base`` ``[N,1,H,W]``: a warm start (e.g. the amortised explainer's logits): the
    mask logits are base + the U-Net's, whose head starts at exactly 0 (:meth:`StackedUNet.zero_head`).
    """
    n_all, device = x.shape[0], x.device
    unet = StackedUNet.from_config(cfg, n_all, x.shape[1], seed, device, x.dtype, tuple(x.shape[-2:]))
    if base is not None:
        unet.zero_head()
    unet.requires_grad_()
    opt = StackedAdam(unet.parameters(), cfg.fit.lr, lr_scale=unet.lr_scales(cfg.fit.offset_lr_scale))
    compiled = resolve_compile(cfg, device)
    finished = resolve_finished(cfg, compiled)
    step_fn = FitStep(step_clf if step_clf is not None else clf, unet, cfg, fast_loss,
                      layer_metrics(cfg, len(clf.layers)), compiled)
    thresholds = (sampler.thresholds(cfg.steps, cfg.fit.threshold, cfg.fit.anneal, x[:, :1])
                  if cfg.fit.binarize == "stochastic" else None)
    final = torch.empty(n_all, 1, *x.shape[2:], device=device, dtype=x.dtype)
    steps = torch.full((n_all,), cfg.steps, dtype=torch.long)
    ids = torch.arange(n_all)                     # image of each row of the batch
    live = torch.ones(n_all, dtype=torch.bool)    # rows still fitting ("mask" keeps finished rows)
    active = None                                 # the same on the device, once a row finished
    streak = torch.zeros(n_all, dtype=torch.long)
    prev_loss = torch.full((n_all,), float("inf"))
    kept_acc = torch.ones(n_all, dtype=torch.bool, device=device)
    window_loss = torch.zeros(n_all, device=device)
    xa, ya, ta, ba = x, label, targets, base
    settle = max(cfg.fit.min_steps, cfg.fit.anneal * cfg.steps if cfg.fit.binarize != "threshold" else 0)
    for step in range(1, cfg.steps + 1):
        r = cfg.fit.rob_draws
        backgrounds = torch.stack([sampler.draw((step - 1) * r + j) for j in range(r)])
        loss, held, mask_logits = step_fn(unet, opt, xa, ya, ta, None if thresholds is None else thresholds[step - 1],
                                          backgrounds, active, ba)
        kept_acc &= held
        window_loss += loss
        last = step == cfg.steps
        if step % cfg.fit.check_every and not last:
            continue
        # --- check (the one host sync of every check_every steps)
        rows = live.nonzero().flatten()
        img = ids[rows]
        kept_now = kept_acc.cpu()[rows]
        cur = window_loss.cpu()[rows]
        flat = (cur - prev_loss[img]).abs() <= cfg.fit.plateau * cur.abs().clamp(min=1e-8)
        streak[img] = torch.where(kept_now, streak[img] + 1, torch.zeros_like(streak[img]))
        prev_loss[img] = cur
        # never before the mask is binarised at the fixed threshold (the stochastic phase)
        done = (streak[img] >= cfg.fit.patience) & flat & (step >= settle)
        if last:
            done[:] = True
        if done.any():
            final[img[done]] = mask_logits[rows[done].to(device)]
            steps[img[done]] = step
            if bool(done.all()):
                break
            if finished == "mask":
                live[rows[done]] = False
                active = live.to(device)
            else:
                keep = rows[~done]
                kd = keep.to(device)
                ids, live = ids[keep], live[keep]
                unet = unet.select(kd)
                opt = opt.select(unet.parameters(), kd)
                sampler = sampler.select(kd)
                xa, ya, ta = xa[kd], ya[kd], _select_targets(ta, kd)
                ba = None if ba is None else ba[kd]
        kept_acc = torch.ones(live.numel(), dtype=torch.bool, device=device)
        window_loss = torch.zeros(live.numel(), device=device)
    return FitResult(final, steps)


def _reference_backgrounds(x: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    """The authors' three robustness backgrounds: zeros, N(0,1) and U[-1,1]."""
    return [torch.zeros_like(x),
            torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype),
            torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1]


def fit_paper(clf, x, label, cfg: MedCAMConfig, seed: int) -> FitResult:
    """The paper-faithful procedure, one image at a time, as the authors' code does it.

    DoubleConv U-Net (``cfg.fit.unet_widths``), Adam at ``cfg.fit.lr`` for ``cfg.steps`` steps; every step
    recomputes f(x), runs f on e = m*x (baseline 0) for AM + KL + CE, and on m_hard*x + (1-m_hard)*r
    for each of three backgrounds separately (KL to f(x), hard mask: no gradient reaches the mask).
    """
    results, steps = [], []
    metrics = layer_metrics(cfg, len(clf.layers))
    for i in range(x.shape[0]):
        xi, yi = x[i:i + 1], label[i:i + 1]
        unet = StackedUNet.from_config(cfg, 1, x.shape[1], seed, x.device, x.dtype, tuple(x.shape[-2:]))
        unet.requires_grad_()
        opt = StackedAdam(unet.parameters(), cfg.fit.lr)
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        for _ in range(cfg.steps):
            with torch.no_grad():
                tgt_logits, tgt_feats = clf.forward(xi, with_activations=True)
            tgt_scales = [losses.channel_rms(t) for t in tgt_feats]
            mask_logits = unet(xi)
            soft, m = straight_through(mask_logits, cfg)
            logits_e, feats_e = clf.forward(m * xi + (1 - m) * cfg.baseline, with_activations=True)
            am = losses.activation_matching(feats_e, tgt_feats, tgt_scales, clf.weights, metrics)
            keep = cfg.fit.act * am + cfg.fit.kl * losses.kl_to_input(logits_e, tgt_logits, cfg.fit.kl_temperature) \
                + cfg.fit.ce * losses.label_ce(logits_e, yi)
            pri = ops.naive.mask_priors(soft, diagonal=cfg.priors.tv_diagonal)
            minimal = cfg.priors.area_weight * pri[:, 0] + cfg.priors.bin * pri[:, 1] + cfg.priors.tv * pri[:, 2]
            hard = (soft > cfg.fit.threshold).to(soft.dtype).detach()
            robust = 0.0
            for r in _reference_backgrounds(xi, gen):
                logits_r = clf.forward(hard * xi + (1 - hard) * r)
                robust = robust + losses.kl_to_input(logits_r, tgt_logits, cfg.fit.kl_temperature)
            loss = (cfg.fit.lambda_am * keep + cfg.priors.lambda_min * minimal
                    + cfg.fit.lambda_rob * cfg.fit.rob * robust)
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            results.append(unet(xi))
        steps.append(cfg.steps)
    return FitResult(torch.cat(results), torch.tensor(steps))
