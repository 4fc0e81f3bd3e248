"""Turns pytest-benchmark JSON into the markdown tables committed under benchmarks/results/.

    python benchmarks/make_table.py ops results/ops_cpu.json [--device cpu] > results/ops_cpu.md
    python benchmarks/make_table.py onnx results/onnx_cpu.json [--device cpu] > results/onnx_cpu.md
    (kinds: ops, unet, onnx, explain, throughput, speed)
"""
import argparse
import json
import sys
from collections import defaultdict


def machine_lines(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    facts = mi.get("medcam_fast", {})
    lines = [
        f"- CPU: {facts.get('cpu_model', mi.get('cpu', {}).get('brand_raw', '?'))}, "
        f"{facts.get('cpu_cores', '?')} cores, torch threads {facts.get('torch_threads', '?')}",
        f"- torch {facts.get('torch', '?')}, Python {mi.get('python_version', '?')}",
    ]
    if facts.get("device"):
        lines.append(f"- GPU: {facts['device']}")
    lines.append(f"- run: {data.get('datetime', '?')}, commit {data.get('commit_info', {}).get('id', '?')[:10]}")
    return lines


def ops_table(data: dict, device: str | None) -> str:
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if device and e["device"] != device:
            continue
        rows[(e["op"], e["device"], e["n"], e["size"])][e["impl"]] = b["stats"]["median"] * 1e3
    out = ["| op | device | N | H=W | fused ms | naive ms | naive compiled ms | fused vs naive | fused vs compiled |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (op, dev, n, size), t in sorted(rows.items()):
        f, nv, c = t.get("fused"), t.get("naive"), t.get("naive_compiled")
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        ratio = lambda a, b: f"{b / a:.2f}x" if a and b else "-"  # noqa: E731
        out.append(f"| {op} | {dev} | {n} | {size} | {fmt(f)} | {fmt(nv)} | {fmt(c)} | {ratio(f, nv)} | {ratio(f, c)} |")
    return "\n".join(out)


def onnx_table(data: dict, device: str | None) -> str:
    rows = defaultdict(dict)
    providers = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if device and e["device"] != device:
            continue
        key = (e["model"], e["device"], e.get("size", "?"), e["batch"])
        rows[key][e["impl"]] = b["stats"]["median"] * 1e3
        if e["impl"] == "ort":
            providers[key] = (e.get("providers") or ["?"])[0].replace("ExecutionProvider", "")
    out = ["| model | device | H=W | N | torch ms | ORT ms | ORT speed-up | ORT provider |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for key, t in sorted(rows.items()):
        model, dev, size, n = key
        tt, to = t.get("torch"), t.get("ort")
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        speedup = f"{tt / to:.2f}x" if tt and to else "-"
        out.append(f"| {model} | {dev} | {size} | {n} | {fmt(tt)} | {fmt(to)} | {speedup} | "
                   f"{providers.get(key, '-')} |")
    return "\n".join(out)


def explain_table(data: dict, device: str | None) -> str:
    rows = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("kind") != "fast_vs_reference":
            continue
        rows[(e["size"], e["mode"])] = e
    out = ["| H=W | mode | images | s / image | speed-up | kept | sufficient | random_pass | mean area | p(y|x) "
           "| p(y|evidence) | status ok | mean steps |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (size, mode), e in sorted(rows.items()):
        ref = rows.get((size, "paper")) or rows.get((size, "reference"))  # "reference": files from before the rename
        speed = f"{ref['seconds_per_image'] / e['seconds_per_image']:.1f}x" if ref else "-"
        out.append(f"| {size} | {mode} | {e['n_images']} | {e['seconds_per_image']:.2f} | {speed} | "
                   f"{e['kept_rate']:.0%} | {e.get('sufficient', float('nan')):.0%} | "
                   f"{e.get('random_pass', float('nan')):.2f} | {e['mean_area']:.1%} | "
                   f"{e['mean_prob_input']:.3f} | {e['mean_prob_evidence']:.3f} | {e['status_ok']}/{e['n_images']} | "
                   f"{e['mean_steps']:.0f} |")
    return "\n".join(out)


def throughput_table(data: dict, device: str | None) -> str:
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("kind") not in ("demo", "families") or (device and e["device"] != device):
            continue
        rows[(e["model"], e["device"], e["size"], e["n"])][e["mode"]] = e["per_second"]
    out = ["| model | device | H=W | N | one by one (expl/s) | batched (expl/s) | batched / one by one |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for (model, dev, size, n), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        single, batched = r.get("single"), r.get("batched")
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        ratio = f"{batched / single:.2f}x" if single and batched else "-"
        out.append(f"| {model} | {dev} | {size} | {n} | {fmt(single)} | {fmt(batched)} | {ratio} |")
    return "\n".join(out)


def unet_table(data: dict, device: str | None) -> str:
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("kind") != "unet" or (device and e["device"] != device):
            continue
        rows[(e["device"], e["size"], e["n"])][e["batching"]] = b["stats"]["median"] * 1e3
    out = ["| device | H=W | N | grouped ms | loop ms | vmap ms | fastest |", "|---|---:|---:|---:|---:|---:|---|"]
    for (dev, size, n), t in sorted(rows.items()):
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        best = min(t, key=t.get) if t else "-"
        out.append(f"| {dev} | {size} | {n} | {fmt(t.get('grouped'))} | {fmt(t.get('loop'))} | {fmt(t.get('vmap'))} "
                   f"| {best} |")
    return "\n".join(out)


def speed_table(data: dict, device: str | None) -> str:
    steps = defaultdict(dict)
    service = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if device and e.get("device") != device:
            continue
        if e.get("kind") == "fit_step":
            steps[(e["model"], e["device"], e["size"], e["n"], e["precision"])][e["mode"]] = e
        elif e.get("kind") == "service":
            service[(e["device"], e["mode"])] = e
    out = ["| model | device | H=W | N | precision | eager ms/step | compiled ms/step | CUDA graphs ms/step "
           "| ms per image-step (best) | first call s (compiled) |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    fmt = lambda e: f"{e['ms_per_step']:.1f}" if e else "-"  # noqa: E731
    for (model, dev, size, n, prec), r in sorted(steps.items()):
        best = min(r.values(), key=lambda e: e["ms_per_step"])
        first = r.get("compiled") or r.get("cudagraphs")
        out.append(f"| {model} | {dev} | {size} | {n} | {prec} | {fmt(r.get('eager'))} | {fmt(r.get('compiled'))} | "
                   f"{fmt(r.get('cudagraphs'))} | {best['ms_per_image_step']:.1f} ({best['mode']}) | "
                   f"{first['first_call_s']:.1f} |" if first else
                   f"| {model} | {dev} | {size} | {n} | {prec} | {fmt(r.get('eager'))} | - | - | "
                   f"{best['ms_per_image_step']:.1f} ({best['mode']}) | - |")
    if service:
        out += ["", "| device | 16 single-image clients | explanations / s | vs one call at a time | batches | "
                "status ok | mean area |", "|---|---|---:|---:|---|---:|---:|"]
        for (dev, mode), e in sorted(service.items()):
            base = service.get((dev, "one_call_at_a_time"))
            ratio = f"{e['per_second'] / base['per_second']:.2f}x" if base else "-"
            out.append(f"| {dev} | {mode} | {e['per_second']:.3f} | {ratio} | {e.get('batches') or '-'} | "
                       f"{e['status_ok']}/{e['n']} | {e['mean_area']:.1%} |")
    return "\n".join(out)


TABLES = {"speed": speed_table, "ops": ops_table, "unet": unet_table, "onnx": onnx_table, "explain": explain_table, "throughput": throughput_table}
WHAT = {"unet": "Median time of one step of N stacked U-Nets (forward + backward), by how they are batched.",
        "onnx": "Median time per call, frozen forward (no grad).",
        "explain": "One explanation at a time (wall time per image, one run).",
        "throughput": "Explanations per second (one run each; model families: random init, fixed 10 steps).",
        "speed": "Fit-step modes (median of 3 calls of 10 steps, after a warm-up call that compiles) and the "
                 "micro-batching service (one run)."}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(TABLES))
    ap.add_argument("json")
    ap.add_argument("--device", default=None)
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    data = json.load(open(args.json))
    print(f"# {args.title or args.kind}\n")
    print(WHAT.get(args.kind, "Median time per call, forward + backward.") + " Machine:\n")
    print("\n".join(machine_lines(data)) + "\n")
    print(TABLES[args.kind](data, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
