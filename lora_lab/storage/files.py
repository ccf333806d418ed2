"""Atomic, pickle-free files that never destroy what is not lora_lab's: safetensors for tensors, JSON otherwise.

The rule every writer follows: lora_lab replaces only what it recognisably wrote itself.
- A "bundle" is a folder of a few files, one of them a JSON config whose "format" names its kind
  (a checkpoint, an adapter, ...). `write_bundle` may replace the target only if it is missing, an empty
  folder, or a bundle of the same kind (its entries are a subset of the bundle's own file names and its
  config has the same format tag). Anything else is refused with OutputExistsError and left untouched.
- An output folder (a report with plots and sub-bundles) carries a marker file; `claim_output_dir`
  creates or accepts only such a folder, or a missing or empty one.
- A single file (`write_file_atomic`) is created anywhere, but replaced only inside a claimed output
  folder or when the caller says overwrite=True.

A bundle is written into a hidden temporary sibling folder, then swapped into place. On Linux that is
one atomic step (renameat2 with RENAME_EXCHANGE). Where renameat2 is missing (macOS, some network
filesystems) it is two renames: the old bundle moves aside to a hidden sibling, then the new one moves
in. A writer killed between the two leaves no bundle at the path, only the moved-aside copy next to the
writer's temp folder; `read_bundle` then reads that copy (whole, checksums verified), and the next writer
moves it back before anything else. So on every platform a reader finds the old or the new bundle, and
an interrupted write leaves one of them whole. The config records a sha256 of each tensor file, which
`read_bundle` verifies.

Hidden names: ".<target>.lora_lab-tmp-<pid>-<random>" (and "-old-" for a moved-aside bundle); a target
name too long for that (over 221 bytes: file names may have 255) is cut and followed by a hash of the
whole name, ".<cut name>.lora_lab~<hash>-tmp-<pid>-<random>". Only names of that form, of the same
target and of a writer that is no longer running, are ever removed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

OUTPUT_MARKER = ".lora_lab_output.json"  # marks a folder that lora_lab's multi-file outputs may write into
CHECKSUMS_KEY = "checksums"
_NAME_MAX = 255  # bytes in one file name (Linux, macOS)
_HIDDEN_TAIL_MAX = 34  # bytes a hidden name adds to the target's: "." + ".lora_lab-" + "tmp-<pid>-<8 hex>"
_READ_ATTEMPTS = 5  # a reader racing a writer's swap may see old config + new tensors: read again


class CorruptFileError(ValueError):
    """A checkpoint or adapter file that cannot be read or is not what it claims to be."""


class OutputExistsError(ValueError):
    """A write refused because something that lora_lab did not write is at the target path."""


# ----------------------------------------------------------------------------------------------
# What is at a path, and may it be replaced?


def _describe(path: Path) -> str:
    """A short human description of what is at `path` (for error messages)."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if path.is_file():
        return f"a file ({path.stat().st_size:,} bytes)"
    if path.is_dir():
        names = sorted(os.listdir(path))
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
        return f"a folder holding {shown}"
    return "something that is neither a file nor a folder"


def _refuse(path: Path, why: str) -> OutputExistsError:
    return OutputExistsError(
        f"Refusing to write {path}: it is {_describe(path)}, {why}. Nothing was changed; "
        "choose another path, or remove it yourself if you no longer need it."
    )


def _read_format(config_path: Path, format_key: str):
    try:
        return read_json(config_path).get(format_key)  # bounded: a 10 GB "config" in the way is not read
    except (OSError, ValueError):
        return None


def check_bundle_target(
    directory: str | os.PathLike,
    *,
    config_file: str,
    format_tag: str,
    files,
    legacy_files=(),
    format_key: str = "format",
    accept_damaged: bool = False,
) -> Path:
    """Raise OutputExistsError unless a bundle may be written at `directory` (see the module docstring).

    files: the bundle's own file names; legacy_files: names older versions also wrote into it.
    accept_damaged: also accept a folder of only those files whose config is missing or unreadable (a
    damaged bundle of ours; for the model cache, whose folders no user writes). Touches nothing.
    """
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return directory
    if directory.is_symlink() or not directory.is_dir():
        raise _refuse(directory, "not a folder that lora_lab wrote")
    entries = os.listdir(directory)
    if not entries:
        return directory
    allowed = set(files) | set(legacy_files)
    foreign = sorted(e for e in entries if e not in allowed or not stat.S_ISREG(os.lstat(directory / e).st_mode))
    if foreign:
        raise _refuse(directory, f"and {foreign[:5]} are not files of a {format_tag} bundle")
    found = _read_format(directory / config_file, format_key)
    if found != format_tag and not (accept_damaged and found is None):
        raise _refuse(directory, f"not a {format_tag} bundle ({config_file} {format_key}: {found!r})")
    return directory


def claim_output_dir(path: str | os.PathLike, format_tag: str, what: str = "claim_output_dir") -> Path:
    """Make `path` a folder lora_lab may write several outputs into (reports, plots, sub-bundles).

    A missing or empty folder is created/claimed by writing the marker file .lora_lab_output.json
    ({"format": format_tag}); a folder that carries the marker with the same tag is accepted as it is.
    Anything else (a file, a link, a folder of the user's files such as `.` or `~`, another kind of
    output) is refused with OutputExistsError and left untouched. `what` names the caller in the messages
    (the public writer, e.g. "write_leaderboard").
    """
    path = _given_path(path, what)  # "." is fine (an empty working directory); "" is a mistake
    marker = path / OUTPUT_MARKER
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise _refuse(path, "not a folder that lora_lab wrote")
    if path.is_dir() and os.listdir(path):
        found = _read_format(marker, "format") if marker.is_file() and not marker.is_symlink() else None
        if found == format_tag:
            return path
        why = (
            f"a lora_lab output of another kind ({found!r}, not {format_tag!r})"
            if found is not None
            else f"not an output folder of lora_lab (it has no {OUTPUT_MARKER})"
        )
        raise _refuse(path, why)
    path.mkdir(parents=True, exist_ok=True)
    _write_new_file(marker, json.dumps({"format": format_tag}, indent=2, sort_keys=True).encode())
    return path


def is_claimed_output_dir(path: str | os.PathLike) -> bool:
    marker = Path(path) / OUTPUT_MARKER
    return marker.is_file() and not marker.is_symlink() and _read_format(marker, "format") is not None


# ----------------------------------------------------------------------------------------------
# Single files


def _given_path(path, what: str) -> Path:
    """`path` as a Path, refusing an empty one: Path("") is the working directory, which the caller never meant."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: the path must be a str or os.PathLike, got {type(path).__name__}.")
    if os.fspath(path) == "":
        raise ValueError(f"{what}: the path is empty (''); name the folder or file to write, e.g. 'runs/adapter'.")
    return Path(path)


def check_output_path(path, what: str) -> Path:
    """`path` as a Path, or ValueError naming it when no folder can be written there: an empty path, or one
    ending in '.', '..' or '/' (the bundle needs a name of its own). Writers call it before any work."""
    path = _given_path(path, what)
    if path.name in ("", ".", ".."):
        raise ValueError(
            f"{what}: {os.fspath(path)!r} names no folder of its own (it ends in '.', '..' or is a root); "
            "name the folder to write, e.g. 'runs/adapter'."
        )
    return path


def _write_new_file(path: Path, data: bytes) -> None:
    """Write through a temporary sibling and an atomic rename (readers see the old or the new file)."""
    _remove_stale_temps(path)
    tmp = path.parent / _hidden_name(path.name, "tmp", os.getpid(), secrets.token_hex(4))
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file_atomic(path: str | os.PathLike, content: bytes | str, *, overwrite: bool = False) -> Path:
    """Write one file atomically. An existing file is replaced only inside a folder claimed with
    claim_output_dir, or with overwrite=True; anything else at `path` is refused (OutputExistsError)."""
    path = check_output_path(path, "write_file_atomic")
    data = content.encode() if isinstance(content, str) else content
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise _refuse(path, "not a file lora_lab may replace")
    if path.exists() and not (overwrite or is_claimed_output_dir(path.parent)):
        raise _refuse(path, "outside a folder claimed by lora_lab (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new_file(path, data)
    return path


def write_json_atomic(path: str | os.PathLike, obj, *, overwrite: bool = False) -> Path:
    return write_file_atomic(path, json.dumps(obj, indent=2, sort_keys=True), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Bundles: write into a temporary sibling, then swap it into place


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or Inf (writers refuse to save those)."""
    return [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tensor_file_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors serialisation of `tensors` (moved to CPU, contiguous), as written to disk."""
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hidden_prefix(name: str) -> str:
    """The start of every hidden name of target `name` (see the module docstring): the name itself when the
    result fits in a file name, else a cut of it and a hash of the whole, so that two long names that differ
    only after the cut still get different prefixes. Neither form can be mistaken for the other: after a "~"
    come hex digits, never "-tmp"/"-old"."""
    if len(os.fsencode(name)) <= _NAME_MAX - _HIDDEN_TAIL_MAX:
        return f".{name}.lora_lab-"
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    room = _NAME_MAX - _HIDDEN_TAIL_MAX - len("~") - len(digest)
    cut = name
    while len(os.fsencode(cut)) > room:  # whole characters only (a surrogate escape is one byte)
        cut = cut[: -max(1, (len(os.fsencode(cut)) - room) // 4)]
    return f".{cut}.lora_lab~{digest}-"


def _hidden_name(name: str, kind: str, pid: int, token: str) -> str:
    return f"{_hidden_prefix(name)}{kind}-{pid}-{token}"


def _hidden_entries(target: Path) -> list[tuple[str, str, int, str]]:
    """(entry name, "tmp" | "old", writer pid, random token) of each hidden sibling of `target`."""
    pattern = re.compile(re.escape(_hidden_prefix(target.name)) + r"(tmp|old)-(\d+)-([0-9a-f]+)")
    try:
        names = os.listdir(target.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((name, match.group(1), int(match.group(2)), match.group(3)))
    return found


def _moved_aside(target: Path, entries=None) -> Path | None:
    """The old bundle a fallback swap moved aside and has not yet replaced by the new one: a "-old-" folder
    whose writer's "-tmp-" folder (same pid and token) is still there, while nothing is at `target`. This is
    the only copy of the bundle then (the writer is between its two renames, or was killed there). An "-old-"
    folder without its temp folder is a finished swap's leftover: never read, never put back."""
    if os.path.lexists(target):
        return None
    entries = _hidden_entries(target) if entries is None else entries
    temps = {(pid, token) for _, kind, pid, token in entries if kind == "tmp"}
    for name, kind, pid, token in entries:
        if kind == "old" and (pid, token) in temps:
            return target.parent / name
    return None


def _remove_stale_temps(target: Path) -> None:
    """Clean up after writers of this target that died (only hidden names of this target, see _hidden_prefix):
    first put back a bundle one moved aside and never replaced, then remove their temp files and folders."""
    entries = [e for e in _hidden_entries(target) if not _pid_alive(e[2])]
    aside = _moved_aside(target, entries)
    if aside is not None:
        os.rename(aside, target)  # killed between the two renames of the fallback swap: the old bundle is back
    for name, *_ in entries:
        path = target.parent / name
        if path == aside:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)


@contextmanager
def _locked(folder: Path):
    """Serialise writers into one parent folder: flock on the folder itself (creates no file)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False when the system or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_bundle(
    directory: str | os.PathLike,
    files: dict[str, dict],
    *,
    config_file: str,
    format_tag: str,
    legacy_files=(),
    format_key: str = "format",
    checksums: bool = True,
    accept_damaged: bool = False,
) -> Path:
    """Atomically (re)place the bundle folder `directory` with `files`, refusing to replace anything else.

    files maps a file name to its content: names ending in .safetensors take {name: tensor}, names ending
    in .json a JSON-serialisable dict. files[config_file][format_key] must be format_tag: that is how the
    bundle is recognised later. With checksums, the config gets {"checksums": {file: "sha256:..."}} for
    every tensor file. May replace: nothing, an empty folder, or a bundle of the same kind (see
    check_bundle_target); otherwise OutputExistsError and nothing is touched.
    """
    directory = check_output_path(directory, "write_bundle")
    names = list(files)
    if files.get(config_file, {}).get(format_key) != format_tag:
        raise ValueError(f"Bundle config {config_file!r} must have {format_key!r}: {format_tag!r}.")
    for name in names:
        if not name.endswith((".safetensors", ".json")) or "/" in name:
            raise ValueError(f"Bundle file {name!r} must be a plain name ending in .safetensors or .json.")
    check = dict(
        config_file=config_file,
        format_tag=format_tag,
        files=names,
        legacy_files=legacy_files,
        format_key=format_key,
        accept_damaged=accept_damaged,
    )
    check_bundle_target(directory, **check)  # before anything is created

    blobs = {n: tensor_file_bytes(c) for n, c in files.items() if n.endswith(".safetensors")}
    config = dict(files[config_file])
    if checksums:
        config[CHECKSUMS_KEY] = {n: _sha256(b) for n, b in blobs.items()}
    blobs.update(
        {
            n: json.dumps(config if n == config_file else c, indent=2, sort_keys=True).encode()
            for n, c in files.items()
            if n.endswith(".json")
        }
    )

    directory.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = directory.parent / _hidden_name(directory.name, "tmp", os.getpid(), token)
    try:
        tmp.mkdir()
        for name, data in blobs.items():
            with open(tmp / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        with _locked(directory.parent):
            _remove_stale_temps(directory)
            check_bundle_target(directory, **check)  # again: something may have appeared meanwhile
            if not directory.exists() or not os.listdir(directory):
                os.rename(tmp, directory)  # rename onto a missing or empty folder is atomic
            elif not _exchange(tmp, directory):
                # No atomic exchange here: move the old bundle aside, then the new one in. In between, readers
                # read the moved-aside copy (see _moved_aside), and a kill there is undone by the next writer.
                old = directory.parent / _hidden_name(directory.name, "old", os.getpid(), token)
                os.rename(directory, old)
                try:
                    os.rename(tmp, directory)
                except BaseException:
                    os.rename(old, directory)  # put the old bundle back
                    raise
                tmp = old
        shutil.rmtree(tmp, ignore_errors=True)  # now the old bundle (or nothing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ----------------------------------------------------------------------------------------------
# Reading


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of every file under `path` (an adapter or checkpoint folder)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


MAX_JSON_BYTES = 64 * 2**20  # a config or record; lora_lab writes a few KB (a weights record: tens of KB)
MAX_JSON_DEPTH = 64  # lora_lab's own files nest a few levels
MAX_HEADER_BYTES = 100 * 2**20  # the most a safetensors header may be (the safetensors library's own limit)
_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _json_depth(obj) -> int:
    depth, level = 0, [(obj, 1)]
    while level:  # iterative, so a deep object cannot exhaust the stack here
        value, d = level.pop()
        if isinstance(value, (dict, list)):
            depth = max(depth, d)
            level.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return depth


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        obj = None
    if obj is None or _json_depth(obj) > MAX_JSON_DEPTH:
        raise CorruptFileError(f"{path} nests JSON more than {MAX_JSON_DEPTH} levels deep; not a lora_lab file.")
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} should hold a JSON object, found {type(obj).__name__}.")
    return obj


def _parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(f"{path} is not a readable safetensors file: {err}") from None


def _read_exactly(fd: int, n: int, shown: Path) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 2**24))
        if not chunk:
            raise CorruptFileError(f"{shown} ended early (it changed while being read?).")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _safetensors_size(fd: int, size: int, shown: Path) -> int:
    """The file size a safetensors header promises (8 + header + the end of the last tensor's data)."""
    if size < 8:
        raise CorruptFileError(f"{shown} is not a readable safetensors file: {size} bytes is too short.")
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise CorruptFileError(f"{shown} is not a readable safetensors file: its header claims {n:,} bytes.")
    header = _parse_json(shown, os.pread(fd, n, 8))
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise CorruptFileError(f"{shown} is not a readable safetensors file: malformed header.") from None
    return 8 + n + end


def _read_file(name: str | os.PathLike, shown: Path, kind: str, dir_fd: int | None = None) -> bytes:
    """The bytes of a regular file (a link to one is followed), bounded by what it may hold: a JSON file
    MAX_JSON_BYTES, a safetensors file exactly the size its header promises. A FIFO, a device (a link to
    /dev/zero) or a socket is refused without blocking or reading it."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)  # O_NONBLOCK: opening a FIFO must not wait
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"Missing file: {shown}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CorruptFileError(f"{shown} is a symbolic link that loops; lora_lab reads only files.") from None
        raise OSError(err.errno, err.strerror, str(shown)) from None  # named by its whole path, not the bare name
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(f"Missing file: {shown} (a folder is there)")
        if not stat.S_ISREG(st.st_mode):
            what = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise CorruptFileError(f"{shown} is {what}; lora_lab reads only regular files.")
        if kind == "json" and st.st_size > MAX_JSON_BYTES:
            raise CorruptFileError(f"{shown} is {st.st_size:,} bytes, more than a JSON file of lora_lab's can be.")
        if kind == "safetensors":
            promised = _safetensors_size(fd, st.st_size, shown)
            if promised != st.st_size:
                raise CorruptFileError(
                    f"{shown} is not a readable safetensors file: its header describes {promised:,} bytes, "
                    f"the file holds {st.st_size:,}."
                )
        return _read_exactly(fd, st.st_size, shown)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    return _parse_json(path, _read_file(path, path, "json"))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    return _parse_tensors(path, _read_file(path, path, "safetensors"))


def _read_once(directory: Path, config_file: str, tensor_files) -> tuple[dict, dict[str, dict]]:
    # Open the folder once and read every file relative to it: all files then come from the same
    # folder even if a writer swaps a new bundle in meanwhile.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise _NoFolder(f"No such folder: {directory} (a folder holding {config_file} was expected).") from None
    try:

        def read(name: str) -> bytes:
            return _read_file(name, directory / name, "json" if name == config_file else "safetensors", fd)

        config = _parse_json(directory / config_file, read(config_file))
        recorded = config.get(CHECKSUMS_KEY)  # absent in bundles written before checksums existed
        if CHECKSUMS_KEY in config and not isinstance(recorded, dict):  # null too: it would switch them off
            raise CorruptFileError(f"{directory / config_file}: 'checksums' should be a JSON object.")
        tensors = {}
        for name in tensor_files:
            data = read(name)
            if recorded is not None and recorded.get(name) != _sha256(data):
                raise CorruptFileError(
                    f"{directory / name} does not match its checksum in {config_file} "
                    "(the file was changed or damaged after it was written)."
                )
            tensors[name] = _parse_tensors(directory / name, data)
        return config, tensors
    finally:
        os.close(fd)


class _NoFolder(FileNotFoundError):
    """Nothing (or no folder) at a bundle's path."""


def read_bundle(directory: str | os.PathLike, *, config_file: str, tensor_files) -> tuple[dict, dict[str, dict]]:
    """Read a bundle: (config dict, {tensor file name: {tensor name: tensor}}), checksums verified.

    Raises FileNotFoundError for a missing folder or file and CorruptFileError (naming the file) for a
    damaged one. A read that races a writer's swap is retried a few times before it counts as damaged. When
    nothing is at `directory` because a fallback swap is between its two renames (or its writer was killed
    there), the moved-aside old bundle is read instead: it is the bundle at that path until the new one is in.
    """
    directory = Path(directory)
    for attempt in range(_READ_ATTEMPTS):
        try:
            try:
                return _read_once(directory, config_file, tensor_files)
            except _NoFolder:
                aside = _moved_aside(directory)
                if aside is None:
                    raise
                return _read_once(aside, config_file, tensor_files)
        except (CorruptFileError, FileNotFoundError):
            if attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")


def bundle_exists(directory: str | os.PathLike, config_file: str | None = None) -> bool:
    """Whether a bundle folder (holding `config_file`, when given) is at `directory`, counting one a fallback
    swap has moved aside for a moment (see read_bundle): what a reader checks before it reads, not is_dir()."""
    directory = Path(directory)

    def holds(folder: Path) -> bool:
        return folder.is_dir() and (config_file is None or (folder / config_file).is_file())

    if holds(directory):
        return True
    aside = _moved_aside(directory)
    # Looked at again last: a swap that completes while the siblings are listed has put the new bundle in.
    return (aside is not None and holds(aside)) or holds(directory)
