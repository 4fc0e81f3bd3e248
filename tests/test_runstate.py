"""Crash-safe outputs (medcam_fast.runstate): atomic writes, JSONL logs with a half-written last
line, run manifests, and training state saved without pickle."""
import json
import os

import pytest
import torch

from medcam_fast import runstate
from medcam_fast.runstate import ManifestMismatch, atomic_write, check_manifest, load_tree, read_jsonl, save_tree


def test_atomic_write_keeps_the_old_file_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write(path, "old")

    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runstate.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    monkeypatch.undo()
    atomic_write(path, b"new")
    assert path.read_text() == "new" and not (tmp_path / "results.json.part").exists()


def test_read_jsonl_drops_a_half_written_last_line_and_keeps_the_latest_record(tmp_path):
    path = tmp_path / "r.jsonl"
    runstate.append_jsonl(path, [{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    runstate.append_jsonl(path, [{"id": "a", "v": 3}])
    with open(path, "a") as f:
        f.write('{"id": "c"')
    done = read_jsonl(path, lambda r: r["id"])
    assert done == {"a": {"id": "a", "v": 3}, "b": {"id": "b", "v": 2}}
    assert path.read_text().endswith('"v": 3}\n')


def test_manifest_refuses_a_mismatched_resume_and_lists_the_differences(tmp_path):
    m = {"classifier": "abc", "seed": 0, "config": {"steps": 10, "lr": 0.1}}
    check_manifest(tmp_path, m, resume=False)
    check_manifest(tmp_path, json.loads(json.dumps(m)), resume=True)           # the same: fine
    with pytest.raises(ManifestMismatch) as info:
        check_manifest(tmp_path, {**m, "seed": 1, "config": {"steps": 20, "lr": 0.1}}, resume=True)
    assert "seed: 0 in the folder, 1 now" in str(info.value) and "config.steps: 10 in the folder, 20 now" in str(info.value)
    check_manifest(tmp_path, {**m, "seed": 1}, resume=False)                   # a fresh run replaces it
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 1
    with pytest.warns(UserWarning, match="no manifest.json"):
        check_manifest(tmp_path / "old", m, resume=True, has_records=True)


def test_training_state_round_trips_without_pickle(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        net(torch.randn(5, 3)).sum().backward()
        opt.step()
        sched.step()
    gen = torch.Generator().manual_seed(7)
    tree = {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
            "history": [{"step": 1, "loss": 0.5}], "shape": (1, 2), "name": None}
    path = save_tree(tmp_path / "state.ckpt", tree)
    back = load_tree(path)
    assert back["shape"] == (1, 2) and back["history"] == tree["history"] and back["name"] is None
    net2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5)
    net2.load_state_dict(back["net"])
    opt2.load_state_dict(back["opt"])                  # int keys of the optimiser's state survive
    assert set(opt2.state_dict()["state"]) == {0, 1, 2, 3}
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    g2 = torch.Generator()
    g2.set_state(back["gen"])
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=gen))
    with pytest.raises(TypeError, match="cannot be saved without pickling"):
        save_tree(tmp_path / "bad.ckpt", {"f": object()})
    torch.save({"a": 1}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="not a safetensors state file"):
        load_tree(tmp_path / "pickled.ckpt")
