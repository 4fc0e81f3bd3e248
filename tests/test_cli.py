"""The ``medcam-fast`` CLI end to end: ``demo`` on the bundled samples and classifier (in-process through
``main`` and once through the installed entry point), ``explain`` with a corrupt file among good ones,
class folders, split.csv and --mask-dir, TorchScript / torch.export / timm specs on tiny models, the
refusal of pickled checkpoints, ``info``, ``export-onnx`` and the exit codes. Few fit steps, one thread."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from medcam_fast import data
from medcam_fast.cli import main

SAMPLES = data.samples()
NAMES = [s.name for s in SAMPLES]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run(argv):
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def table_names(stdout, names):
    """The first column of the printed table's rows that name one of ``names``, in order."""
    return [line.split()[0] for line in stdout.splitlines() if line.split() and line.split()[0] in names]


def demo_sections(stdout) -> tuple[str, str]:
    """The demo's two printed parts: the per-image fits, then the amortised masks."""
    parts = re.split(r"^== .*$\n", stdout, flags=re.M)
    assert len(parts) == 3 and parts[0] == "", stdout[:300]
    return parts[1], parts[2]


def check_links(out_dir: Path) -> list[str]:
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    for link in links:
        assert not re.match(r"^(/|[a-z]+:)", link), f"not a relative link: {link}"
        assert (out_dir / link).is_file(), f"report.html links to a missing file: {link}"
    return links


class Tiny(nn.Module):
    def __init__(self, in_chans=1, k=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, k)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


# ------------------------------------------------------------------------------------------------------ demo
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc, stdout, stderr = run(["demo", "--steps", 5, "--out", out, "--device", "cpu"])
    return rc, stdout, stderr, out


@pytest.mark.slow
def test_demo_in_process(demo):
    rc, both, stderr, out = demo
    assert rc == 0, stderr
    stdout, amortised_out = demo_sections(both)
    assert table_names(stdout, NAMES) == NAMES                      # one table row per sample, in order
    header = stdout.splitlines()[0].split()
    assert header == ["name", "class", "p(x)", "p(evidence)", "sufficient", "area", "a*", "random_pass",
                      "flipped_removed", "p(blank)", "blank_keeps", "status", "necessary", "nec_area", "nec_random",
                      "seconds"]                                  # two-sided by default
    # the null audit is in the printed table too: samples called glioma (the blank image's call) are
    # kept by the blank image, the others not
    from medcam_fast import zoo

    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[2:2 + len(NAMES)]}
    called = {r["name"]: r["predicted_class"] for r in zoo.card()["sample_predictions"]}
    assert {n: rows[n][10] for n in NAMES} == {n: "yes" if called[n] == "glioma" else "no" for n in NAMES}
    assert set(called.values()) > {"glioma"}                         # both answers are exercised
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    links = check_links(out)
    assert len([link for link in links if link.endswith(".png")]) == len(SAMPLES)
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == NAMES
    assert results["metadata"]["config"]["steps"] == 5 and results["metadata"]["config"]["fit"]["min_steps"] == 5
    assert results["class_names"] == ["glioma", "meningioma", "pituitary"]
    assert all(r["ground_truth"] for r in results["rows"])           # the bundled tumour masks are drawn
    assert {r["true_class"] for r in results["rows"]} == {"glioma", "meningioma", "pituitary"}
    html = (out / "report.html").read_text()
    for r in results["rows"]:                                         # the blank-image finding, in words
        if r["null_keeps_label"]:
            assert f"this classifier predicts {r['class_name']} for a blank image" in html
    assert {r["source"] for r in results["rows"]} == {"fit"}
    # and the bundled amortised explainer's masks, one pass each, through the same checks
    assert table_names(amortised_out, NAMES) == NAMES
    amortised = json.loads((out / "amortised" / "results.json").read_text())
    assert {r["source"] for r in amortised["rows"]} == {"amortised"} and {r["steps"] for r in amortised["rows"]} == {0}
    assert amortised["metadata"]["amortised"]["card"]["classifier"]["fingerprint"]
    assert [r["null_keeps_label"] for r in amortised["rows"]] == [r["null_keeps_label"] for r in results["rows"]]
    assert len([link for link in check_links(out / "amortised") if link.endswith(".png")]) == len(SAMPLES)


@pytest.mark.slow
def test_demo_entry_point_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("medcam-fast")
    assert exe.is_file(), f"console script not installed at {exe} (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([str(exe), "demo", "--steps", "1", "--out", str(tmp_path / "d"), "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    fits, amortised = demo_sections(p.stdout)
    assert table_names(fits, NAMES) == NAMES and table_names(amortised, NAMES) == NAMES
    check_links(tmp_path / "d")
    assert len(json.loads((tmp_path / "d" / "results.json").read_text())["rows"]) == len(SAMPLES)


# ------------------------------------------------------------------------------------------------------ explain
def test_explain_goes_on_past_a_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    good = [SAMPLES[0].path, SAMPLES[5].path]
    rc, stdout, stderr = run(["explain", "--model", "demo", "--input", good[0], bad, good[1], "--out",
                              tmp_path / "o", "--steps", 2, "--device", "cpu"])
    assert rc == 1
    assert "1 input(s) failed" in stderr and str(bad) in stderr and "Traceback" not in stderr
    assert table_names(stdout, [p.name for p in good]) == [p.name for p in good]
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [f["path"] for f in results["failures"]] == [str(bad)]
    assert "corrupt.png" in results["failures"][0]["error"]
    assert len(results["rows"]) == 2
    assert "corrupt.png" in (tmp_path / "o" / "report.html").read_text()
    assert len(check_links(tmp_path / "o")) == 2


@pytest.fixture
def scripted(tmp_path, tiny):
    # a TorchScript archive under a .pth name: formats are told apart by content, not suffix
    path = tmp_path / "tiny_scripted.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(tiny), str(path))
    return path


@pytest.fixture
def exported(tmp_path, tiny):
    path = tmp_path / "tiny.pt2"
    program = torch.export.export(tiny, (torch.rand(2, 1, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("kind", ["scripted", "exported"])
def test_torchscript_and_torch_export_specs(request, tmp_path, kind):
    model_file = request.getfixturevalue(kind)
    inputs = [SAMPLES[0].path, SAMPLES[3].path]
    rc, stdout, stderr = run(["explain", "--model", model_file, "--input", *inputs, "--size", 32, "--steps", 2,
                              "--classes", "a,b,c", "--out", tmp_path / "o", "--device", "cpu"])
    assert rc == 0, stderr
    assert table_names(stdout, [p.name for p in inputs]) == [p.name for p in inputs]
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {r["class_name"] for r in results["rows"]} <= {"a", "b", "c"}
    assert results["metadata"]["preprocess"] == {"input_size": [32, 32], "mean": [0.0], "std": [1.0]}
    assert results["metadata"]["model"]["format"] == ("torchscript" if kind == "scripted" else "export")
    if kind == "scripted":
        assert any("logits only" in n for n in results["notes"])
    assert all("necessary_status" in r for r in results["rows"])                   # both sides by default
    check_links(tmp_path / "o")
    rc, stdout, stderr = run(["explain", "--model", model_file, "--input", inputs[0], "--size", 32, "--steps", 2,
                              "--out", tmp_path / "one", "--device", "cpu", "--necessary", "off"])
    assert rc == 0, stderr
    assert "necessary" not in stdout.splitlines()[0].split()
    assert all("necessary_status" not in r for r in json.loads((tmp_path / "one" / "results.json").read_text())["rows"])
    # without --size there is no way to know the input size
    rc, _, stderr = run(["explain", "--model", model_file, "--input", inputs[0], "--out", tmp_path / "p"])
    assert rc == 2 and "--size" in stderr


def test_timm_spec_with_safetensors_metadata(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    weights = tmp_path / "r.safetensors"
    save_file(model.state_dict(), str(weights), metadata={"input_size": "[1, 40, 40]", "mean": "[0.25]",
                                                          "std": "[0.5]", "class_names": '["x", "y", "z"]'})
    rc, stdout, stderr = run(["explain", "--model", f"timm:resnet10t:{weights}", "--input", SAMPLES[0].path,
                              "--steps", 1, "--out", tmp_path / "o", "--device", "cpu"])
    assert rc == 0, stderr
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["metadata"]["preprocess"] == {"input_size": [40, 40], "mean": [0.25], "std": [0.5]}
    assert results["class_names"] == ["x", "y", "z"]
    # a wrong class count does not fit the weights: refused, strictly
    rc, _, stderr = run(["explain", "--model", f"timm:resnet10t:{weights}:5", "--input", SAMPLES[0].path,
                         "--out", tmp_path / "p"])
    assert rc == 2 and "do not fit" in stderr


def test_inputs_from_class_folders_csv_and_mask_dir(tmp_path, scripted):
    root = tmp_path / "folders"
    for s in SAMPLES[:3]:
        (root / s.class_name).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, root / s.class_name / s.path.name)
    csv_root = tmp_path / "shared"
    lines = ["id,label,split,image,mask"]
    for s in SAMPLES[3:6]:
        for sub in ("images", "masks"):
            (csv_root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, csv_root / "images" / s.path.name)
        shutil.copy(s.mask_path, csv_root / "masks" / s.mask_path.name)
        lines.append(f"{s.name.split('_')[1]},{s.class_name},{'test' if s is not SAMPLES[5] else 'train'},"
                     f"images/{s.path.name},masks/{s.mask_path.name}")
    (csv_root / "split.csv").write_text("\n".join(lines) + "\n")
    mask_dir = tmp_path / "masks"                                 # a mask for the single file only
    mask_dir.mkdir()
    shutil.copy(SAMPLES[6].mask_path, mask_dir / SAMPLES[6].mask_path.name)
    rc, stdout, stderr = run(["explain", "--model", scripted, "--size", 32, "--steps", 1, "--out", tmp_path / "o",
                              "--input", root, csv_root / "split.csv", SAMPLES[6].path, "--split", "test",
                              "--mask-dir", mask_dir, "--device", "cpu"])
    assert rc == 0, stderr
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    want = [f"{s.class_name}/{s.path.stem}" for s in sorted(SAMPLES[:3], key=lambda s: (s.class_name, s.path.name))]
    assert [r["name"] for r in rows] == want + [SAMPLES[3].name, SAMPLES[4].name, SAMPLES[6].path.name]
    assert [r["true_class"] for r in rows[:5]] == [w.split("/")[0] for w in want] + \
        [SAMPLES[3].class_name, SAMPLES[4].class_name]
    assert [r["ground_truth"] for r in rows[:3]] == [None] * 3    # class folders bring no masks, none in mask-dir
    assert rows[3]["ground_truth"].endswith(SAMPLES[3].mask_path.name)     # from split.csv
    assert rows[5]["ground_truth"] == str(mask_dir / SAMPLES[6].mask_path.name)   # from --mask-dir


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("what", ["state_dict", "module", "legacy_pickle"])
def test_pickled_checkpoints_are_refused(tmp_path, tiny, monkeypatch, what):
    path = tmp_path / {"state_dict": "w.pth", "module": "m.pt", "legacy_pickle": "old.ckpt"}[what]
    if what == "state_dict":
        torch.save(tiny.state_dict(), path)
    elif what == "module":
        torch.save(tiny, path)
    else:
        torch.save(tiny.state_dict(), path, _use_new_zipfile_serialization=False)

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load must never be called on a user's checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    rc, stdout, stderr = run(["explain", "--model", path, "--input", SAMPLES[0].path, "--size", 32,
                              "--out", tmp_path / "o"])
    assert rc == 2
    assert "arbitrary code" in stderr and "safetensors" in stderr and "torch.export" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,message", [
    (["explain", "--model", "nope.pt", "--input", "x.png", "--out", "o"], "no such file"),
    (["explain", "--model", "timm:resnet10t", "--input", "x.png", "--out", "o"], "bad timm spec"),
    (["explain", "--model", "demo", "--input", "x.png", "--out", "o", "--target", "7"], "--target 7"),
    (["explain", "--model", "demo", "--input", "x.png", "--out", "o", "--size", "64"], "do not apply"),
    (["demo", "--steps", "0", "--out", "o"], "--steps"),
    (["demo", "--device", "nonsense", "--out", "o"], "--device"),
    (["explain", "--model", "demo", "--input", "x.png", "--out", "o", "--refine", "5"], "--explainer"),
    (["train-explainer", "--model", "demo", "--input", "x.png", "--out", "o.pt"], ".safetensors"),
    (["bogus"], "invalid choice"),
    (["explain", "--model", "demo"], "required"),
])
def test_usage_errors_exit_2(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, _, stderr = run(argv)
    assert rc == 2 and message in stderr and "Traceback" not in stderr


# ------------------------------------------------------------------------------------------------------ amortised
@pytest.mark.slow
def test_train_explainer_then_explain_with_it(tmp_path):
    out = tmp_path / "ex.safetensors"
    argv = ["train-explainer", "--model", "demo", "--input", data.SAMPLES_DIR / "images", "--out", out, "--steps", 2,
            "--batch", 4, "--device", "cpu", "--val-input", SAMPLES[0].path, SAMPLES[1].path]
    rc, stdout, stderr = run(argv)
    assert rc == 0, stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["recipe"]["steps"] == 2 and card["data"]["images"] == len(SAMPLES)
    assert card["classifier"]["name"] == "demo" and "CC BY 4.0" in card["data"]["licence"]
    assert set(card["figures"]["rows"]) == {"amortised", "amortised+refine20"}
    assert out.with_suffix(".ckpt").is_file()
    rc, stdout, stderr = run(argv)                                   # rerun: resumes from its checkpoint, done
    assert rc == 0 and json.loads(out.with_suffix(".json").read_text())["training"]["resumed_from_step"] == 2
    # samples with a certified fill (an image without one is not refined: nothing can be shown there)
    rc, stdout, stderr = run(["explain", "--model", "demo", "--input", SAMPLES[3].path, SAMPLES[6].path, SAMPLES[0].path,
                              "--out", tmp_path / "o", "--explainer", out, "--refine", 2, "--device", "cpu"])
    assert rc == 0, stderr
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [r["source"] for r in rows] == ["amortised+refine"] * 3 and [r["steps"] for r in rows] == [2, 2, 0]
    assert rows[2]["status"] == "null_keeps_label" and rows[2]["certified_fills"] == "none"
    # an explainer for another classifier is refused with the reason, not a traceback
    rc, _, stderr = run(["explain", "--model", f"timm:resnet10t:{_tiny_timm(tmp_path)}", "--input", SAMPLES[0].path,
                         "--out", tmp_path / "o2", "--explainer", out, "--device", "cpu"])
    assert rc == 2 and "fingerprint" in stderr and "Traceback" not in stderr


def _tiny_timm(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    path = tmp_path / "r10.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------------------ info, ONNX
def test_info():
    rc, stdout, _ = run(["info"])
    assert rc == 0
    for s in ("medcam_fast", "build_info:", "cpu_ops:", "cuda_ops:", f"torch: {torch.__version__}", "torchvision:",
              "timm:", "onnxruntime:", "devices:", "cpu (", "onnxruntime providers:", "demo classifier:"):
        assert s in stdout, s


def test_export_onnx_demo(tmp_path):
    import onnx  # noqa: F401  (pinned in requirements.txt: fails, never skips)
    import onnxruntime  # noqa: F401  (pinned in requirements.txt: fails, never skips)
    # the legacy exporter keeps this test short; the dynamo default is covered by tests/test_onnx.py
    rc, stdout, stderr = run(["export-onnx", "--model", "demo", "--out", tmp_path / "demo.onnx", "--exporter",
                              "legacy", "--device", "cpu"])
    assert rc == 0, stderr
    assert "ONNX export OK" in stdout and "input [N, 1, 128, 128]" in stdout and "max abs diff" in stdout
    assert re.search(r"batch\s+1: max abs diff \S+\s+ok", stdout)
    assert (tmp_path / "demo.onnx").stat().st_size > 100_000


# ------------------------------------------------------------------------------------------------ crash safety
def _rows_without_times(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())["rows"]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.mark.slow
def test_explain_killed_then_resumed_gives_the_uninterrupted_results(tmp_path):
    """SIGKILL after the first batch is on disk, then ``--resume``: the same rows as a run never
    killed, the recorded batches not redone; a resume with another seed is refused."""
    inputs = [s.path for s in SAMPLES]
    argv = ["explain", "--model", "demo", "--input", *inputs, "--steps", 2, "--batch", 2, "--device", "cpu"]
    rc, _, _ = run(argv + ["--out", tmp_path / "whole"])
    assert rc == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medcam_fast.cli", *map(str, argv), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = killed / "records.jsonl"
    try:
        while proc.poll() is None and not (records.is_file() and records.read_text().count("\n") >= 2):
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    recorded = records.read_text().count("\n")
    assert proc.returncode == -9 and 2 <= recorded < len(inputs), (proc.returncode, recorded)
    assert not (killed / "results.json").exists()
    with open(records, "a") as f:                  # as if killed mid-write: half a line, dropped and redone
        f.write('{"path": "' + str(inputs[-1]))
    rc, _, stderr = run(argv + ["--out", killed, "--resume", "--seed", 1])
    assert rc == 2 and "cannot be resumed" in stderr and "seed: 0 in the folder, 1 now" in stderr
    rc, _, _ = run(argv + ["--out", killed, "--resume"])
    assert rc == 0
    assert _rows_without_times(killed / "results.json") == _rows_without_times(tmp_path / "whole" / "results.json")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["path"] for r in lines) == sorted(map(str, inputs))   # each image once: none redone
    assert "resumed: " in (killed / "report.html").read_text()
    check_links(killed)


def test_every_parsed_command_has_a_runner():
    from medcam_fast.cli import COMMANDS
    from medcam_fast.cli_parser import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
