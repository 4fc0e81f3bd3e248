"""The card of an amortised explainer, as Markdown."""
from __future__ import annotations


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def explainer_card_markdown(card: dict) -> str:
    """A readable card from the card dict that :func:`medcam_fast.amortised.save` stores."""
    arch, rec, tr = card.get("architecture", {}), card.get("recipe", {}), card.get("training", {})
    clf = card.get("classifier", {})
    lines = [f"# Amortised Med-CAM explainer: {card.get('name', 'unnamed')}", "",
             f"- **Explains:** classifier `{clf.get('name', '?')}` (fingerprint `{clf.get('fingerprint')}`: "
             "refused for any other weights), inputs "
             f"{card.get('input_shape')} [C,H,W], {card.get('num_classes')} classes"
             + (f" ({', '.join(card['class_names'])})" if card.get("class_names") else "") + ".",
             f"- **Network:** class-conditional U-Net (FiLM), widths {arch.get('widths')}, at 1/{arch.get('scale')} "
             "resolution; one pass gives the mask logits for an image and a class.",
             f"- **Recipe:** {rec.get('steps')} steps of {rec.get('batch')} images, Adam lr {rec.get('lr')} "
             f"(cosine to {rec.get('lr_final')}x), {_pct(rec.get('wrong_rate'))} of each batch for a class the "
             "classifier does not give (priors only: their masks must not pass), stochastic thresholds for the first "
             f"{_pct(rec.get('anneal'))} of the steps; the per-image fit's loss (MedCAMConfig in the JSON card).",
             f"- **Training:** {tr.get('images')} images; {tr.get('seconds')} s on "
             f"{tr.get('machine')} ({tr.get('threads')} threads, torch {tr.get('torch')}), {tr.get('date')}."]
    if card.get("command"):
        lines.append(f"- **Command:** `{card['command']}`")
    data = card.get("data") or {}
    for key in ("description", "source", "licence", "caveat"):
        if data.get(key):
            lines.append(f"- **Data {key}:** {data[key]}")
    fig = card.get("figures")
    if fig:
        lines += ["", f"## Figures ({fig.get('split', '?')} split, {fig.get('n')} images)", "",
                  "| | status ok | mean area | sufficient | s / image |", "|---|---:|---:|---:|---:|"]
        for name, r in fig.get("rows", {}).items():
            lines.append(f"| {name} | {_pct(r.get('ok'))} | {_pct(r.get('area'))} | {_pct(r.get('sufficient'))} | "
                         f"{r.get('seconds_per_image', float('nan')):.3f} |")
        if "wrong_label_pass" in fig:
            lines.append(f"\nWrong labels: masks for a class the classifier does not give pass the sufficiency test "
                         f"in {_pct(fig['wrong_label_pass'])} of {fig.get('n')} images.")
    return "\n".join(lines) + "\n"
