"""Crash-safe run outputs: files written atomically, records appended one complete line at a time,
and a run manifest that refuses to resume a run made with another classifier, config or seed.

A killed process leaves either the old file or the new one, never half of one (``atomic_write``:
a temporary file in the same folder, flushed, then ``os.replace``), and at most one half-written
last line of a JSONL log, which :func:`read_jsonl` drops and cuts so it is redone. Training state is
saved as safetensors with a JSON skeleton (:func:`save_tree`): nothing here unpickles.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

__all__ = ["ManifestMismatch", "append_jsonl", "atomic_write", "check_manifest", "load_tree", "read_jsonl",
           "save_tree"]

MANIFEST = "manifest.json"


class ManifestMismatch(ValueError):
    """A resume was asked for, but the folder's run was made with other settings."""


def atomic_write(path, data: str | bytes) -> Path:
    """Writes ``data`` to ``path`` so that a reader or a crash sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    return path


def append_jsonl(path, records: list[dict]) -> None:
    """Appends ``records`` as JSON lines in one write, flushed to disk (a kill loses at most a
    partial last line, which :func:`read_jsonl` drops)."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, key: Callable[[dict], object]) -> dict:
    """The records of a JSONL log by ``key(record)`` (a later record replaces an earlier one).

    A half-written last line (a run killed mid-write: no newline at its end, or no JSON) is dropped
    and cut from the file, so it is redone and the next append starts a clean line; a bad line
    before the last is corruption and raises ValueError naming it."""
    done = {}
    path = Path(path)
    if not path.is_file():
        return done
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]        # tail: "" when the file ends with a newline
    if tail.strip() == "" and complete:
        try:
            json.loads(complete[-1]) if complete[-1].strip() else None
        except json.JSONDecodeError:
            tail = complete.pop() + "\n" + tail
    if tail.strip():
        with open(path, "r+b") as f:
            f.truncate(len(text.encode("utf-8")) - len(tail.encode("utf-8")))
    for n, line in enumerate(complete, 1):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not a JSON record ({exc}); the file is corrupt") from exc
            done[key(r)] = r
    return done


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the folder, {b!r} now")
    return out


def check_manifest(out_dir, manifest: dict, resume: bool, has_records: bool = False) -> None:
    """Writes ``out_dir/manifest.json``, or, to resume, checks the folder's against ``manifest``.

    ``manifest``: JSON-ready facts that decide the results (classifier fingerprint, config, seed,
    ...). ``resume`` False: a fresh run; the manifest is (re)written. ``resume`` True: an existing
    manifest must equal ``manifest`` on every key, else :class:`ManifestMismatch` lists each
    difference; with none (a fresh folder) it is written. ``has_records``: the folder holds records
    but no manifest (a run from before manifests): adopted with a warning."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    manifest = json.loads(json.dumps(manifest))   # the JSON form: tuples as lists, keys as strings
    if resume and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc}): cannot tell what made this run") from exc
        diff = _differences(old, manifest)
        if diff:
            raise ManifestMismatch(f"{out_dir} holds a run made with other settings, so it cannot be resumed: "
                                   + "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
                                   + ". Use another output folder, or the same settings")
        return
    if resume and has_records:
        warnings.warn(f"{out_dir} holds records but no {MANIFEST} (a run from before manifests): resumed as "
                      "if its settings were these, which cannot be checked", stacklevel=2)
    atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------ state trees without pickle
def _pack(obj, tensors: dict, where: str):
    import torch

    if torch.is_tensor(obj):
        tensors[where] = obj.detach().cpu().contiguous()
        return {"__tensor__": where}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _pack(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _pack(v, tensors, f"{where}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__" + type(obj).__name__ + "__": [_pack(v, tensors, f"{where}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be saved without pickling")


def _unpack(obj, tensors: dict, device):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]].to(device)
        if "__items__" in obj:
            return {k if not isinstance(k, list) else tuple(k): _unpack(v, tensors, device) for k, v in obj["__items__"]}
        if "__list__" in obj:
            return [_unpack(v, tensors, device) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors, device) for v in obj["__tuple__"])
        return {k: _unpack(v, tensors, device) for k, v in obj.items()}
    return obj


def save_tree(path, tree: dict) -> Path:
    """Saves nested dicts / lists / tuples of tensors and plain values (an optimiser's state, say)
    as one safetensors file, atomically: tensors as tensors, the rest as JSON in its metadata.
    Nothing is pickled, so loading runs no code."""
    from safetensors.torch import save

    tensors: dict = {}
    skeleton = _pack(tree, tensors, "t")
    return atomic_write(path, save(tensors, metadata={"tree": json.dumps(skeleton)}))


def load_tree(path, device="cpu") -> dict:
    """The tree :func:`save_tree` wrote, tensors on ``device``. ValueError for a file that is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file, said as such
        raise ValueError(f"{path} is not a safetensors state file ({type(exc).__name__}: {exc})") from exc
    if "tree" not in meta:
        raise ValueError(f"{path} is a safetensors file but not a saved state (no 'tree' in its metadata)")
    return _unpack(json.loads(meta["tree"]), tensors, device)
