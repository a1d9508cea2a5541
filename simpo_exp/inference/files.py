"""Whole-file writes for resumable stages: a killed process leaves the old file or the new one, never half.

Every file goes to a temporary name beside its target and is renamed over it (os.replace is atomic
on one file system), so a stage can tell a finished shard from a missing one by its existence.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import uuid
from pathlib import Path

from simpo_exp.errors import UserError


def temporary_name(path: Path) -> Path:
    """A name beside ``path`` that no other process writes: not the process id alone, which processes of other
    containers (one PID namespace each, on a shared file system) can share."""
    return Path(path).with_name(f"{Path(path).name}.{uuid.uuid4().hex[:16]}.tmp")


def probe_writable(folder: Path) -> None:
    """Make ``folder`` and write and remove a file in it (each process its own: ``temporary_name``); the OSError
    where it cannot be."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    probe = temporary_name(Path(folder) / ".write-test")
    probe.write_text("")
    probe.unlink()


def umask() -> int:
    """The process's file-creation mask (from /proc where there is one: setting and restoring it races with
    threads that create files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_as_umask(path: Path) -> None:
    """Give each safetensors file at or under ``path`` the mode any other new file gets (0o666 less the umask).

    safetensors 0.8 writes through a temporary file created with mode 0o600 and renames it, ignoring the umask
    (safetensors issue #782): a model, checkpoint or reference cache written by one user would be unreadable to
    the colleague who evaluates it or shares the cache, while its config.json beside it is readable."""
    path = Path(path)
    files = [path] if path.is_file() else path.rglob("*.safetensors")
    mode = 0o666 & ~umask()
    for f in files:
        with contextlib.suppress(OSError):  # a file system without modes (some object-store mounts): as written
            os.chmod(f, mode)


def write_atomic(path: Path, text: str) -> None:
    """``text`` (UTF-8) at ``path``, whole: written to a temporary name and flushed to the disk before the rename, so
    that a machine going down right after leaves the old file or the new one, not a renamed file missing its tail."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a stop signal: the old file stays, and no half-written one beside it
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """One row added to a JSONL file, written out before the next one (a killed process keeps it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


@functools.lru_cache(maxsize=64)
def _sha256_cached(files: tuple[tuple[str, int, int], ...], names: bool = True) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        if names:
            h.update(Path(name).name.encode())
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """A file's SHA-256, as ``sha256sum`` gives it; kept per process while its size and time are unchanged."""
    st = Path(path).stat()
    return _sha256_cached(((str(path), st.st_size, st.st_mtime_ns),), names=False)


def sha256_files(files: list[Path]) -> str:
    """One SHA-256 over the files' names (not their folder) and contents: the same weights anywhere on disk give
    the same hash. Kept per process while the files' sizes and times are unchanged (a stage hashes a model's
    weights once, not once per benchmark)."""
    return _sha256_cached(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in map(Path, files)))


def weights_sha256(model_dir: Path) -> str:
    """``sha256_files`` of a local model directory's weights (its safetensors, else its .bin files) and config."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return sha256_files([f for f in [*files, model_dir / "config.json"] if f.is_file()])


# what renders a local model's prompts and ends its answers, beside its weights (transformers 5 writes the chat
# template to chat_template.jinja; older versions into tokenizer_config.json)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def tokenizer_sha256(model_dir: Path) -> str | None:
    """``sha256_files`` of a local model directory's tokenizer, chat template and generation config (None where it
    holds none): a template fixed in a run's model/ makes other answers from the same weights."""
    files = [Path(model_dir) / name for name in TOKENIZER_FILES if (Path(model_dir) / name).is_file()]
    return sha256_files(files) if files else None


def manifest_changes(
    stored: dict, now: dict, keys=None, prefix: str = "", stored_only: bool = False, said=("stored", "now")
) -> list[str]:
    """What differs between a stored manifest and this command's, as ``dotted.key: stored X, now Y`` (nested
    sections compared key by key, so the message names ``generate.temperature``, not ``generate``). ``keys``:
    the top-level keys to compare (default: every key of either; with ``stored_only``, at every level, those the
    stored manifest has: an older one was written before the others were recorded). ``said``: the words for the
    two sides."""
    out = []
    default = set(stored) if stored_only else set(stored) | set(now)
    for key in sorted(keys if keys is not None else default):
        a, b = stored.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += manifest_changes(a, b, None, f"{prefix}{key}.", stored_only, said)
        elif a != b:
            out.append(f"{prefix}{key}: {said[0]} {_short(a)}, {said[1]} {_short(b)}")
    return out


def _short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters in its middle: two paths differ at their ends (``.../other-rm``),
    which a cut at the end left out of the message that names their difference."""
    text = repr(value)
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    return text[:head] + "..." + text[len(text) - (limit - 3 - head) :]


class DamagedFile(UserError, ValueError):
    """A stage's own file that does not read back (cut short or changed by hand)."""


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a file written whole by ``write_jsonl`` (a bad line, or one that holds no JSON object, is an
    error naming the file and line, not skipped)."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFile(
            f"{path}: not valid UTF-8 at byte {e.start}; the file was cut short or edited. Delete it and "
            f"{_rerun()}: the stage makes it again"
        ) from e
    for n, line in enumerate(jsonl_lines(text), 1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DamagedFile(
                f"{path}: line {n} is not valid JSON ({e}); the file was cut short or edited. Delete it and "
                f"{_rerun()}: the stage makes it again"
            ) from e
        if not isinstance(row, dict):  # valid JSON, but no record: an edit (its readers take each line's fields)
            raise DamagedFile(
                f"{path}: line {n} holds a JSON {type(row).__name__}, not a record; the file was edited. Delete it "
                f"and {_rerun()}: the stage makes it again"
            )
        rows.append(row)
    return rows


def _rerun() -> str:
    from simpo_exp.rundir import rerun_command  # rundir reads JSONL through this module

    return rerun_command()


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at "\\n" only. ``str.splitlines`` also splits at U+2028, U+2029 and
    U+0085, which JSON leaves unescaped inside strings (``ensure_ascii=False`` writes them as they are): a
    sampled response holding one would be cut in two."""
    return text.split("\n")
