"""Atomic, pickle-free files: safetensors for tensors, JSON for everything else.

A "bundle" is a directory holding `<name>.safetensors` and `<name>.json`. It is written into a
temporary sibling directory first and then renamed into place, so a reader never sees half a bundle
and an interrupted write leaves the previous bundle untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CorruptFileError(ValueError):
    """A checkpoint or adapter file that cannot be read or is not what it claims to be."""


def write_file_atomic(path: str | os.PathLike, content: bytes | str) -> Path:
    """Write one file through a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_file_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_bundle(directory: str | os.PathLike, files: dict[str, dict | dict[str, torch.Tensor]]) -> Path:
    """Atomically (re)place `directory` with the given files.

    files maps a file name to its content: names ending in .safetensors take {name: tensor},
    names ending in .json take a JSON-serialisable dict.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in content.items()}
                save_file(tensors, str(tmp / name))
            elif name.endswith(".json"):
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True))
            else:
                raise ValueError(f"Bundle file {name!r} must end in .safetensors or .json.")
        if directory.exists():
            # Swap: move the old bundle aside, move the new one in, then delete the old one.
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
            os.replace(directory, old / "bundle")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of every file under `path` (an adapter or checkpoint folder)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Missing file: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} should hold a JSON object, found {type(obj).__name__}.")
    return obj


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path} is not a readable safetensors file: {err}") from None
