"""The build: the compiled ops are present where required, and a bad build falls back loudly."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medcam_fast
from medcam_fast import _ext


def test_build_info_shape():
    info = medcam_fast.build_info()
    assert set(info) >= {"cpu_ops", "cuda_ops", "torch", "cuda"}
    assert isinstance(info["cpu_ops"], bool) and isinstance(info["cuda_ops"], bool)
    if info["cpu_ops"]:
        assert info["torch"] == torch.__version__
    else:   # not loaded: the reason is said (the naive twins serve)
        assert info.get("error"), info


@pytest.mark.skipif(os.environ.get("MEDCAM_FAST_REQUIRE_OPS") != "1", reason="set MEDCAM_FAST_REQUIRE_OPS=1")
def test_cpu_ops_built():
    # make test and CI set MEDCAM_FAST_REQUIRE_OPS=1: a silent fallback to the naive ops must fail.
    info = medcam_fast.build_info()
    assert info["cpu_ops"], f"CPU ops not loaded: {info['error']}"
    if os.environ.get("MEDCAM_FAST_REQUIRE_CUDA_OPS") == "1":
        assert info["cuda_ops"], "CUDA ops were required but not built"


def test_mismatched_build_is_not_loaded(tmp_path, monkeypatch):
    fake = tmp_path / "_build_info.json"
    fake.write_text(json.dumps({"cpu_ops": True, "cuda_ops": False, "torch": "0.0.1", "cuda": None}))
    monkeypatch.setattr(_ext, "_INFO_PATH", fake)
    info = _ext._load()
    assert not info["cpu_ops"] and "0.0.1" in info["error"]


def test_missing_build_falls_back_with_one_warning(tmp_path):
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import medcam_fast\n"
        "    from medcam_fast import ops\n"
        "    p = ops.mask_priors(torch.rand(2, 1, 4, 4))\n"
        "    ops.compose(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), 0.0, torch.rand(1, 1, 2, 2))\n"
        "print(medcam_fast.build_info()['cpu_ops'], sum('naive' in str(x.message) for x in w), p.shape)\n"
    )
    env = {**os.environ, "MEDCAM_FAST_BUILD_INFO": str(tmp_path / "missing.json")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "1", "torch.Size([2,", "3])"]


@pytest.mark.parametrize("cap, archs, runs", [
    ((9, 0), "8.0;9.0", True), ((8, 6), "8.0;9.0", True), ((8, 9), "8.0 9.0", True),
    ((12, 0), "8.0;9.0", False), ((7, 5), "8.0;9.0", False), ((12, 0), "8.0;9.0+PTX", True),
    ((7, 5), "8.0+PTX", False), ((9, 0), "9.0a", True), ((10, 0), "9.0a", False), ((8, 0), None, False),
])
def test_cuda_arch_rule(cap, archs, runs):
    assert _ext.cuda_arch_runs(cap, archs) is runs


def test_gpu_outside_the_arch_list_falls_back(monkeypatch):
    # a GPU whose arch was not compiled (and no PTX) must not count as served by the kernels
    state = {**_ext.state(), "cpu_ops": True, "cuda_ops": True, "cuda_arch_list": "8.0;9.0"}
    monkeypatch.setattr(_ext, "_state", state)
    monkeypatch.setattr(_ext, "_cuda_ok", {})
    caps = {0: (12, 0), 1: (9, 0)}
    monkeypatch.setattr(_ext, "_device_capability", lambda d: caps[d.index])
    with pytest.warns(RuntimeWarning, match=r"not for cuda:0 \(compute 12.0\); using the naive"):
        assert _ext.has_kernel(torch.device("cuda", 0)) is False
    assert _ext.has_kernel(torch.device("cuda", 1)) is True
    assert _ext.has_kernel(torch.device("cuda", 0)) is False   # cached: one warning per device


def test_build_info_reports_archs_and_clones():
    info = medcam_fast.build_info()
    if info["cuda_ops"]:
        assert info["cuda_arch_list"] and _ext._parse_arch_list(info["cuda_arch_list"])
    if info["cpu_ops"]:
        assert info["cpu_isa"] in info["cpu_isas"]
    else:
        assert info.get("error"), info


def test_gpu_check_script_is_consistent():
    # benchmarks/gpu_check.sh runs only where a GPU is lent: keep it parseable, its files real,
    # and every failure counted (no step may run outside `step`)
    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for ref in set(re.findall(r"(?:tests|benchmarks)/[\w/]+\.(?:py|sh|md)", text)):
        assert (root / ref).is_file(), f"gpu_check.sh names {ref}, which does not exist"
    assert "exit 1" in text and 'failed+=' in text
    lines = text.splitlines()
    for prev, line in zip([""] + lines, lines):
        if re.match(r"\s*\$PY -m pytest", line) and not prev.rstrip().endswith("\\"):
            raise AssertionError(f"a pytest run outside step(): its failure would not count: {line}")
