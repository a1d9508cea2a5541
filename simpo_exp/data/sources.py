"""Load preference sources and normalise them to prompt / chosen / rejected.

A source is a hub data set id, a local JSON/JSONL/Parquet file, a local directory holding one
file (or shard set) per split, or ``synthetic``. Whatever its schema, every row becomes

    {"prompt": [{"role", "content"}, ...], "chosen": str, "rejected": str, "drop_reason": str}

where ``chosen``/``rejected`` are the final assistant turns. Rows that cannot be used get a
non-empty ``drop_reason`` and are counted and removed later, never silently.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Value, load_dataset

from simpo_exp.config import DatasetConfig, SourceConfig, SyntheticConfig
from simpo_exp.data import synthetic
from simpo_exp.errors import UserError
from simpo_exp.hub import hub_reachable, looked_in, looks_like_local_path, why_offline
from simpo_exp.inference.files import file_sha256

log = logging.getLogger(__name__)

FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# datasets caches map() results next to a source's files under a fingerprint of the function and
# its arguments, but hashes a module-level function by its name, not its code: after an edit to the
# rules below, a rerun on the same files would silently reuse the old results. This file's hash is
# passed along as an argument so that any edit gives a new fingerprint.
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
SOURCE_COLUMN = "source"  # the name of the dataset.sources entry a row came from
ROW_COLUMN = "__row__"  # its place (0-based) in the split as the source's files were read: a dropped row can be found
SHOWN_ROWS = 5  # dropped rows named per source, split and reason
# Declared, not inferred: a writer batch made only of dropped rows (prompt []) would otherwise be
# typed list<null>, and the next batch with real messages could not be cast to it; sources
# normalised separately also always concatenate.
NORMALISED_FEATURES = Features(
    {
        "prompt": [{"role": Value("string"), "content": Value("string")}],
        "chosen": Value("string"),
        "rejected": Value("string"),
        "drop_reason": Value("string"),
    }
)


class DataSourceError(UserError, RuntimeError):
    """A source cannot be read, or lacks a column it needs; the message names source and file."""


# ---------------------------------------------------------------------------- loading
# What datasets' save_to_disk writes beside its Arrow files: a folder holding one of the markers is one of its; none
# of them is a split's data file
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
DATASETS_METADATA = (*SAVE_TO_DISK_MARKERS, "dataset_info.json")


def _file_type(path: Path, source: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataSourceError(
            f"dataset.sources.{source}: {path} has an unsupported extension {suffix!r}; "
            f"use one of {', '.join(FILE_TYPES)}"
        )
    return FILE_TYPES[suffix]


def _load_files(files: list[Path], source: str) -> Dataset:
    types = {_file_type(f, source) for f in files}
    if len(types) > 1:
        raise DataSourceError(f"dataset.sources.{source}: mixed file types in {[str(f) for f in files]}")
    empty = [str(f) for f in files if f.is_file() and f.stat().st_size == 0]
    if empty:  # datasets fails on these with a bare StopIteration
        raise DataSourceError(f"dataset.sources.{source}: {', '.join(empty)} is empty (0 bytes)")
    # datasets knows a local file by its path and time: an edit that keeps the time (cp -p, rsync -a, tar) would be
    # read from its cache as it was. Named by the files' contents, the cache holds one data set per content.
    content = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]
    try:
        # escaped: datasets reads data_files as glob patterns, and a sweep job's folder ("seeds=[1,2]") matched nothing
        files_given = [glob.escape(str(f)) for f in files]
        kind = types.pop()
        # a JSON column whose values change kind is refused by pyarrow: datasets' default ("use_json") turns such a
        # column into JSON text chunk by chunk (10 MB each, and each shard apart), so a number past the first chunk
        # quoted every string of its chunk ("good r0" trained as '"good r0"') under a column still typed string
        mixed = {"on_mixed_types": None} if kind == "json" else {}
        with _quiet(JSON_READER_LOG):  # its error (a row counted from 0) is said below, once, with the line
            return load_dataset(kind, name=f"sha256-{content}", data_files=files_given, split="train", **mixed)
    except Exception as e:  # unreadable or malformed file: datasets puts the parser's words (line, column) in the cause
        blank = [str(f) for f in files if f.suffix.lower() in (".jsonl", ".json") and _blank(f)]
        if blank:  # datasets says only that the split "corresponds to no data"
            raise DataSourceError(f"dataset.sources.{source}: {', '.join(blank)} holds no rows (blank lines only)")
        not_json = first_bad_json_line(files)  # a line cut short reads as a column that changes kind too
        changed = re.search(r"Column\(/([^)/\[]+)[^)]*\) changed from", f"{e} {e.__cause__ or ''}")
        if changed and not not_json:  # pyarrow names the column and a row within its chunk: the line is found here
            raise DataSourceError(mixed_kinds(source, changed.group(1), _first_other_kind(files, changed.group(1))))
        named = ", ".join(map(str, files))
        if not_json:  # the line itself: datasets' words count rows from 0 and may name a column that is not at fault
            raise DataSourceError(f"dataset.sources.{source}: cannot read {named}{not_json}") from e
        lines = [line for line in str(e.__cause__ or "").splitlines() if line.strip()]
        # the first line and the last, which says why where datasets lists a schema in between (shards whose
        # columns differ: "Couldn't cast ... because column names don't match")
        cause = f" ({lines[0]}{' ... ' + lines[-1] if len(lines) > 1 else ''})" if lines else ""
        raise DataSourceError(
            f"dataset.sources.{source}: cannot read {named}: {str(e) or type(e).__name__}{cause}"
        ) from e


def one_type_each(ds: Dataset, files: list[Path], source: str, src: SourceConfig) -> Dataset:
    """``ds`` where its prompt, chosen and rejected columns each hold one kind of value. A JSON column whose rows
    differ in kind (a number among strings, strings beside message lists) datasets reads as ``Json``, and decodes
    every string in it that parses as JSON: "42" became 42 and '"Yes"' Yes, so valid rows were altered or dropped
    and the rows named were the wrong ones; a message list with one number among its contents is read the same
    way, its contents decoded. Refused, naming the first line that differs."""
    columns = [c for c in (src.prompt_column, src.chosen_column, src.rejected_column) if c in ds.column_names]
    mixed = [c for c in columns if holds_json(ds.features[c])]
    if not mixed:
        return ds
    raise DataSourceError(mixed_kinds(source, mixed[0], _first_other_kind(files, mixed[0])))


def mixed_kinds(source: str, column: str, where: str) -> str:
    """The refusal of a column whose rows hold values of more than one kind (``where``: the first two lines)."""
    return (
        f"dataset.sources.{source}: column {column!r} holds values of more than one kind{where}; every row's "
        f"{column!r} must be a string (or every row's a list of messages, each content a string). Fix those rows "
        "(a number or null among texts), or leave them out of the file"
    )


def holds_json(feature) -> bool:
    """Whether a column's type is, or holds, datasets' ``Json``: a message list whose ``content`` differs in kind
    between rows (a number in one message) is ``List({role: string, content: Json})``, which decodes every
    message's content that parses as JSON, as a top-level ``Json`` column does."""
    from datasets import Json

    if isinstance(feature, Json):
        return True
    if isinstance(feature, dict):
        return any(holds_json(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(holds_json(f) for f in feature)
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return inner is not None and holds_json(inner)


def _kind(value) -> str:
    """A row's value as a kind: ``str``, ``int``; a message list by what its messages hold (``list of str``)."""
    if not isinstance(value, list):
        return type(value).__name__
    held = {type(v).__name__ for m in value for v in (m.values() if isinstance(m, dict) else [m])}
    return f"list of {'/'.join(sorted(held))}"


def _first_other_kind(files: list[Path], column: str) -> str:
    """`` (a str at <file>:1, a int at <file>:7)``: the first JSON Lines row whose ``column`` is another kind of
    value than the first row's; "" where it cannot be told (a .json or .parquet file)."""
    first = None
    for f in (f for f in files if f.suffix.lower() == ".jsonl"):
        with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError), open(f, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                row = json.loads(line) if line.strip() else None
                if not isinstance(row, dict) or row.get(column) is None:  # a missing value is dropped, not decoded
                    continue
                kind = _kind(row[column])
                if first is None:
                    first = (kind, f"{f}:{number}")
                elif kind != first[0]:
                    return f" (a {first[0]} at {first[1]}, a {kind} at {f}:{number})"
    return ""


def _blank(path: Path) -> bool:
    try:
        return not path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return False


JSON_READER_LOG = "datasets.packaged_modules.json.json"  # logs a file it cannot parse at ERROR, before raising


@contextlib.contextmanager
def _quiet(name: str):
    """The logger ``name`` silenced inside the block (its messages are the caller's to report)."""
    logger = logging.getLogger(name)
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def first_bad_json_line(files: list[Path]) -> str:
    """Where the first line of a JSON Lines file that is not JSON (or not an object, a row) is, counted from 1 as
    editors count (the parser datasets uses counts its rows from 0), or "" where every line reads."""
    for f in (f for f in files if f.suffix.lower() == ".jsonl"):
        try:
            with open(f, encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    row = json.loads(line) if line.strip() else None
                    if not isinstance(row, (dict, type(None))):
                        kind = type(row).__name__
                        return f"; first line that is not a JSON object: {f}:{number} (a {kind}; a row is an object)"
        except json.JSONDecodeError as e:
            return f"; first line that is not JSON: {f}:{number} ({e.msg} at column {e.colno})"
        except (OSError, UnicodeDecodeError):
            return ""
    return ""


def _split_files(directory: Path, split: str, warn: bool = True) -> list[Path]:
    """Files of one split in a directory: ``<split>.jsonl`` or hub-style shards ``data/<split>-00000-of-00001.parquet``
    (``<split>-<n>``). Other names that start with the split's (``train.orig.jsonl``, ``train-old.jsonl``: a backup
    beside the data) are not read, and said so: read as shards, every row would be trained on twice."""
    found = []
    for pattern in (f"{split}.*", f"{split}-*", f"**/{split}.*", f"**/{split}-*"):
        found += [Path(p) for p in glob.glob(str(Path(glob.escape(str(directory))) / pattern), recursive=True)]
    found = sorted({f for f in found if f.suffix.lower() in FILE_TYPES})
    # train.jsonl, train-00000-of-00002.parquet, and the older hub writer's train-00000-of-00001-17309c769bfe5733
    shard = re.compile(rf"^{re.escape(split)}(-\d+(-of-\d+)?(-[0-9a-f]{{8,}})?)?$")
    ignored = [str(f) for f in found if not shard.match(f.stem)]
    if ignored and warn:
        log.warning(
            "split %r in %s: not read (not %s.<ext> or a %s-<n> shard): %s", split, directory, split, split, ignored
        )
    found = [f for f in found if shard.match(f.stem)]
    folders = sorted({str(f.parent) for f in found})
    if len(folders) > 1:  # e.g. an old copy in a subfolder: its rows would be read twice
        raise DataSourceError(
            f"{directory}: files for split {split!r} in more than one folder ({', '.join(folders)}); "
            "point the path at the folder to read"
        )
    whole = [f for f in found if f.stem == split]
    if whole and len(found) > 1:  # each file can hold the whole split: a copy beside the data, read twice
        raise DataSourceError(
            f"{directory}: split {split!r} is in {[f.name for f in found]}, and {whole[0].name} alone can hold all of "
            "it (a train.json beside train.jsonl, a merged copy beside the hub's shards): every row would be read "
            "twice; keep one"
        )
    _check_shard_set(found, directory, split)
    return found


def _check_shard_set(files: list[Path], directory: Path, split: str) -> None:
    """Hub shards say how many there are (``train-00001-of-00004``): a set with one missing (a download cut short)
    would train on part of the data, and two sets in one folder (an old download beside a new one) on each row
    twice. Refused, naming the files. Two files of one shard number (the older hub writer's names end in a hash:
    ``train-00000-of-00001-f198c941cb94b0ba``, and a set re-uploaded under another hash, or without one, downloads
    beside it) are two sets too."""
    sets: dict[int, set[int]] = {}
    numbered: dict[tuple[int, int], list[str]] = {}
    for f in files:
        m = re.match(rf"^{re.escape(split)}-(\d+)-of-(\d+)", f.stem)
        if m:
            sets.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
            numbered.setdefault((int(m.group(1)), int(m.group(2))), []).append(f.name)
    twice = [names for names in numbered.values() if len(names) > 1]
    if twice:
        raise DataSourceError(
            f"{directory}: split {split!r} has shard {twice[0][0].split('-of-')[0].rsplit('-', 1)[-1]} more than once "
            f"({', '.join(sorted(twice[0]))}): an older download beside a newer one, every row read twice; keep one "
            "set"
        )
    if len(sets) > 1:
        counts = ", ".join(f"-of-{n:05d}" for n in sorted(sets))
        raise DataSourceError(
            f"{directory}: split {split!r} has shards of {len(sets)} sets ({counts}: {[f.name for f in files]}), "
            "an older download beside a newer one; keep one set"
        )
    for total, numbers in sets.items():
        missing = sorted(set(range(total)) - numbers)
        if missing:
            raise DataSourceError(
                f"{directory}: split {split!r} lacks shard(s) {', '.join(f'{n:05d}' for n in missing)} of {total} "
                f"(found {[f.name for f in files]}); download the rest"
            )


@contextlib.contextmanager
def _offline_hub():
    """Make datasets read only its local cache (no minute of retries when there is no network)."""
    import datasets
    import huggingface_hub

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load_hub(src: SourceConfig, source: str, split: str) -> Dataset:
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _offline_hub():
            ds = load_dataset(src.path, src.name, split=split, revision=src.revision)
    except Exception as e:
        words = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Unknown split" in words:  # read from the cache (or the hub), which has other splits: not a cache miss
            key = "train_split" if split == src.train_split else "test_split"
            raise DataSourceError(f"dataset.sources.{source}.{key}={split!r}: {src.path!r} says {words}") from e
        if ("BuilderConfig" in words and "not found" in words) or "Couldn't find cache for" in words:
            # online datasets names the configs there are; offline, those in the cache (the set is cached)
            said = " ".join(str(e).split())
            raise DataSourceError(f"dataset.sources.{source}.name={src.name!r}: {src.path!r} says {said}") from e
        if online:
            raise DataSourceError(f"dataset.sources.{source}: cannot load {src.path!r} split {split!r}: {e}") from e
        first = Path(src.path).parts[0] if Path(src.path).parts else ""
        local = (
            f" (no local path {src.path!r} either, though ./{first} is a folder: a typo?)"
            if first and Path(first).is_dir()
            else ""
        )
        raise DataSourceError(
            f"dataset.sources.{source}: data set {src.path!r} (split {split!r}) is not in datasets' local cache and "
            f"the hub cannot be reached ({why_offline()}){local}. Load it once on a connected machine "
            "(datasets' cache; offline, a copy `hf download` put in the hub cache is not read from there), or set "
            f"dataset.sources.{source}.path=DIR, a folder of its files: `hf download {src.path} --repo-type dataset "
            f"--local-dir DIR`, or JSONL/Parquet saved one file per split (e.g. {split}.jsonl)."
        ) from e
    check_revision_read(src, source, ds, online)
    return ds


def check_revision_read(src: SourceConfig, source: str, ds: Dataset, online: bool) -> None:
    """Offline, datasets reads its latest cached copy of a hub set whatever ``revision`` says: a pinned commit the
    copy read is not is refused, naming both. A branch or tag name cannot be checked offline: said."""
    read = hub_commit_read(src, ds).get("hub_commit")
    pinned = src.revision
    if not pinned or read is None:  # nothing pinned, or not read from datasets' commit-named cache folder
        return
    if re.fullmatch(r"[0-9a-f]{7,40}", pinned):
        if read.startswith(pinned):
            return
        folder = Path(ds.cache_files[0]["filename"]).parent.parent
        raise DataSourceError(
            f"dataset.sources.{source}.revision={pinned!r}: datasets read commit {read} from its cache ({folder}; "
            "offline it reads the latest cached copy, whatever the revision). Load the pinned commit once on a "
            f"connected machine (and move the other commits' folders out of {folder}), or set the revision to "
            "the commit read"
        )
    if not online:
        log.warning(
            "dataset.sources.%s.revision=%r: read offline from datasets' latest cached copy, commit %s; a branch or "
            "tag name cannot be checked against it (pin a commit hash to have it checked)",
            source,
            pinned,
            read,
        )


def is_synthetic(src: SourceConfig) -> bool:
    return src.format == "synthetic" or src.path == "synthetic"


def load_split(src: SourceConfig, source: str, split: str, synthetic_cfg) -> Dataset:
    """Load one split of a source as a raw ``Dataset`` in the source's own schema."""
    if is_synthetic(src):
        rows = synthetic.generate(synthetic_cfg)
        if split not in rows:
            raise DataSourceError(
                f"dataset.sources.{source}: the synthetic source has splits {list(rows)}, not {split!r}"
            )
        return Dataset.from_list(rows[split])
    path = Path(src.path).expanduser()
    if path.is_file():
        return one_type_each(_load_files([path], source), [path], source, src)
    if path.is_dir():
        saved = [f for f in SAVE_TO_DISK_MARKERS if (path / f).is_file()]
        if saved:  # datasets' save_to_disk: Arrow files and their metadata, no data file of a split
            raise DataSourceError(
                f"dataset.sources.{source}.path={src.path!r} is a folder written by datasets' save_to_disk "
                f"({saved[0]}): its Arrow files are not read here; write each split out once, e.g. "
                "load_from_disk(path)['train'].to_json('train.jsonl') (or .to_parquet), and point path at that folder"
            )
        files = _split_files(path, split)
        if not files:
            key = "train_split" if split == src.train_split else "test_split"
            raise DataSourceError(
                f"dataset.sources.{source}.{key}={split!r}: no file for split {split!r} in {path} "
                f"(looked for {split}.jsonl/.json/.parquet or shards {split}-00000-of-00002.parquet, also under "
                f"subfolders; the splits there: {', '.join(splits_in(path)) or 'none'})"
                + (
                    f"; set dataset.sources.{source}.test_split=null to hold out test_size of train instead"
                    if split == src.test_split and split != src.train_split
                    else ""
                )
            )
        return one_type_each(_load_files(files, source), files, source, src)
    if looks_like_local_path(src.path) or path.suffix.lower() in FILE_TYPES:  # (data.JSONL too)
        raise DataSourceError(
            f"dataset.sources.{source}.path={src.path!r}: no such file or directory{looked_in(src.path)}"
        )
    return _load_hub(src, source, split)


def splits_in(directory: Path) -> list[str]:
    """The split names a folder's data files give (``train.jsonl``, ``data/test_prefs-00000-of-00001.parquet``)."""
    names = set()
    for f in directory.rglob("*"):
        if f.suffix.lower() in FILE_TYPES and not any(p.startswith(".") for p in f.relative_to(directory).parts):
            if f.name in DATASETS_METADATA:  # no rows
                continue
            names.add(re.sub(r"-\d+-of-\d+(-[0-9a-f]{8,})?$", "", f.stem))
    return sorted(names)


def read_test_split(src: SourceConfig, path: Path) -> str | None:
    """The split a source's test pairs are read from: its ``test_split``; where it names none, a directory's
    ``test`` file(s), else those named as its train split's counterpart (``train_prefs`` -> ``test_prefs``: a hub
    set's folder read through dataset=local); None where the test split is carved out of train."""
    if src.test_split is not None or not path.is_dir():
        return src.test_split
    for counterpart in dict.fromkeys(("test", src.train_split.replace("train", "test"))):
        if counterpart != src.train_split and _split_files(path, counterpart, warn=False):
            return counterpart
    return None


def carves_test(src: SourceConfig) -> bool:
    """Whether the source's test split is carved out of its train rows (no test split read: one file, or a
    directory without a test file and no test_split named)."""
    path = Path(src.path).expanduser()
    return path.is_file() or read_test_split(src, path) is None


def carved_share(src: SourceConfig, dcfg: DatasetConfig) -> float:
    """The share of a source's train rows held out as its test split where it has none: its own ``test_size``,
    else ``dataset.test_size`` (a preset's own share stays its own in a mixture of presets)."""
    return src.test_size if src.test_size is not None else dcfg.test_size


def load_source(name: str, src: SourceConfig, dcfg: DatasetConfig) -> tuple[Dataset, Dataset]:
    """Return (train, test) in the source's own schema, with the mixer's fraction applied to train."""
    path = Path(src.path).expanduser()
    single_file = path.is_file()
    train = numbered(load_split(src, name, src.train_split, dcfg.synthetic))
    test_split = read_test_split(src, path)
    if test_split != src.test_split:
        log.info("dataset.sources.%s: test split from the directory's %r file(s)", name, test_split)
    if single_file and src.train_split != SourceConfig.train_split:  # one the user named, which a file has not
        log.warning(
            "dataset.sources.%s.path is one file, read whole as the train split: train_split=%r names nothing in "
            "it; point the path at the directory that holds the split files to choose one",
            name, src.train_split,
        )  # fmt: skip
    if test_split is not None and single_file and test_split != SourceConfig.test_split:  # one the user named
        log.warning(
            "dataset.sources.%s.path is one file: its test split is carved out of it (test_size %s), and "
            "test_split=%r is not read; point the path at the directory that holds both splits to read it",
            name, carved_share(src, dcfg), test_split,
        )  # fmt: skip
    elif test_split is None and path.is_dir():
        others = [s for s in ("validation", "valid", "dev", "eval") if _split_files(path, s)]
        if others:
            log.warning(
                "dataset.sources.%s: the test split is carved out of train (test_size %s); %s has a %r split "
                "file, which is not read: set dataset.sources.%s.test_split=%s to evaluate on it",
                name, carved_share(src, dcfg), path, others[0], name, others[0],
            )  # fmt: skip
    if (src.name or src.revision) and not is_synthetic(src) and path.exists():
        log.warning(
            "dataset.sources.%s: name=%r and revision=%r are a hub data set's; %s is a local path, read as it is",
            name, src.name, src.revision, path,
        )  # fmt: skip
    if test_split is not None and not single_file:
        if src.test_size is not None:  # a sweep over it would train one run under several names
            log.warning(
                "dataset.sources.%s.test_size=%s is not used: the source's test split is read (%r), not carved",
                name, src.test_size, test_split,
            )  # fmt: skip
        test = numbered(load_split(src, name, test_split, dcfg.synthetic))
    else:
        if len(train) < 2:  # a JSON object of splits ({"train": [...], "test": [...]}) reads as one row
            raise DataSourceError(
                f"dataset.sources.{name}: {len(train)} row(s) (columns {data_columns(train)}) cannot be split into "
                "train and test; a file holds a list of rows (one split per file, train.jsonl and test.jsonl in a "
                "directory)"
            )
        try:
            parts = train.train_test_split(test_size=carved_share(src, dcfg), seed=dcfg.shuffle_seed)
        except ValueError as e:  # a share that leaves either side empty
            key = f"dataset.sources.{name}.test_size" if src.test_size is not None else "dataset.test_size"
            raise DataSourceError(
                f"{key}={carved_share(src, dcfg)} cannot carve a test split out of the {len(train)} train rows of "
                f"dataset.sources.{name} ({str(e).splitlines()[0]}); use a share that leaves rows on both sides, "
                "or a test file"
            ) from None
        train, test = parts["train"], parts["test"]
        log.info(
            "dataset.sources.%s: no test split read; %d of its %d train rows held out as its test split "
            "(test_size %s, seed dataset.shuffle_seed)",
            name, len(test), len(train) + len(test), carved_share(src, dcfg),
        )  # fmt: skip
    if src.fraction < 1.0:  # the split's first rows, as alignment-handbook's mixer (and so the SimPO repo) keeps them
        train = train.select(range(max(1, int(src.fraction * len(train)))))
    return train, test


def data_columns(ds: Dataset) -> list[str]:
    """The columns the data itself has (not the row numbers ``numbered`` adds)."""
    return [c for c in ds.column_names if c != ROW_COLUMN]


def numbered(ds: Dataset) -> Dataset:
    """The split with each row's place in it (``ROW_COLUMN``), kept through carving, fractions and normalising."""
    return ds.add_column(ROW_COLUMN, list(range(len(ds))))


# ---------------------------------------------------------------------------- normalising
def _check_columns(ds: Dataset, src: SourceConfig, name: str) -> None:
    need = [src.chosen_column, src.rejected_column]
    if src.format == "strings" or (src.format != "messages" and _has_string_responses(ds, src)):
        # Plain-string responses carry no conversation: the prompt can only come from its column.
        need.append(src.prompt_column)
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        implicit = missing == [src.prompt_column] and not any(
            "prompt" in c.lower() or "instruction" in c.lower() or "question" in c.lower() for c in ds.column_names
        )
        hint = (
            " Without a prompt column, chosen and rejected must be message lists whose earlier turns are the prompt: "
            'texts holding the whole conversation (HH-RLHF\'s "\\n\\nHuman: ... \\n\\nAssistant: ...") '
            "are not split here: convert them to message lists, or give the prompt a column of its own."
            if implicit
            else ""
        )
        raise DataSourceError(
            f"dataset.sources.{name} ({src.path}): missing column(s) {missing}; the data has {data_columns(ds)}. "
            f"Map them with dataset.sources.{name}.prompt_column / chosen_column / rejected_column.{hint}"
        )


def _has_string_responses(ds: Dataset, src: SourceConfig) -> bool:
    """Whether the chosen column holds plain strings (not message lists), from the data's schema."""
    feature = ds.features.get(src.chosen_column)
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _encoded_messages(value) -> bool:
    """A string that holds a JSON message list (``json.dumps`` of ``[{"role", "content"}, ...]``): read as a
    response, the model would be trained on the JSON text."""
    if not (isinstance(value, str) and value.lstrip().startswith("[{")):
        return False
    try:
        decoded = json.loads(value)
    except ValueError:
        return False
    return _is_messages(decoded) and bool(decoded) and all("role" in m and "content" in m for m in decoded)


def _turn_text(messages: list, what: str):
    """The last turn's content, or (None, reason)."""
    if not messages:
        return None, f"empty {what} conversation"
    last = messages[-1]
    if last.get("role") != "assistant":
        return None, f"{what} does not end with an assistant turn"
    return last.get("content"), None


# The roles chat templates know by name (OpenAI's and transformers' conventions; Llama 3.1's ipython for tool output)
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")


def unknown_role(prompt: list[dict]) -> str | None:
    """A prompt turn's role no chat template knows (``usr``, ``User``, ShareGPT's ``human``), or None. A template
    that writes the role as given (Llama-3's headers, ChatML) trains on a header the model never saw; others skip
    the turn (``tokenize.unrendered_role`` catches those once rendered)."""
    return next((m["role"] for m in prompt if m.get("role") not in ROLES), None)


def _turns(messages: list[dict]) -> list[dict]:
    """Each message as just its role and content."""
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


def prompt_messages(prompt_value, chosen) -> list[dict] | None:
    """The prompt conversation of a row, one rule for training and the generate stage: the chosen conversation
    without its last (assistant) turn when it has earlier turns (a system turn, several exchanges), else the
    prompt column: a string as one user turn, or a message list as it is (TRL's conversational format, with
    the replies alone in chosen and rejected); None when neither is there."""
    if _is_messages(chosen) and len(chosen) > 1:
        return _turns(chosen[:-1])
    if isinstance(prompt_value, str):
        return [{"role": "user", "content": prompt_value}]
    if _is_messages(prompt_value) and prompt_value:
        return _turns(prompt_value)
    return None


def normalise_row(row: dict, src: SourceConfig) -> dict:
    prompt_value = row.get(src.prompt_column)
    chosen, rejected = row.get(src.chosen_column), row.get(src.rejected_column)
    out = {"prompt": [], "chosen": "", "rejected": "", "drop_reason": ""}

    def drop(reason: str) -> dict:
        out["drop_reason"] = reason
        return out

    if chosen is None or rejected is None:
        return drop("missing chosen/rejected")
    as_messages = _is_messages(chosen) or _is_messages(rejected)
    if src.format == "messages" and not as_messages:
        return drop("expected message lists")
    if src.format == "strings" and as_messages:
        return drop("non-string content")
    if as_messages:
        if not (_is_messages(chosen) and _is_messages(rejected)):
            return drop("chosen and rejected have different shapes")
        chosen_text, why = _turn_text(chosen, "chosen")
        if why:
            return drop(why)
        rejected_text, why = _turn_text(rejected, "rejected")
        if why:
            return drop(why)
    else:
        if src.format == "auto" and (_encoded_messages(chosen) or _encoded_messages(rejected)):
            return drop("message list encoded as a JSON string (decode it, or set format=strings)")
        chosen_text, rejected_text = chosen, rejected
    prompt = prompt_messages(prompt_value, chosen)
    if prompt is None:
        if prompt_value is not None and not as_messages:
            return drop("non-string content")
        return drop(f"no prompt (column {src.prompt_column!r} empty or missing, no earlier turns in chosen)")

    texts = [chosen_text, rejected_text] + [m["content"] for m in prompt]
    if not all(isinstance(t, str) for t in texts) or not all(isinstance(m["role"], str) for m in prompt):
        return drop("non-string content")
    if (role := unknown_role(prompt)) is not None:
        return drop(f"unknown role {role!r} in the prompt (chat templates know {', '.join(ROLES[:4])}, ...)")
    if as_messages and len(rejected) > 1 and _turns(rejected[:-1]) != prompt:  # the rejected reply answers another
        if len(chosen) > 1:
            return drop("chosen and rejected have different earlier turns")
        return drop("rejected's earlier turns differ from the prompt")  # chosen is its reply alone
    if (
        as_messages
        and len(chosen) > 1
        and _is_messages(prompt_value)
        and prompt_value
        and _turns(prompt_value) != prompt
    ):
        return drop("prompt column differs from chosen's earlier turns")  # which one is the prompt?
    if not chosen_text.strip() or not rejected_text.strip():
        return drop("empty response")
    if not any(m["content"].strip() for m in prompt):
        return drop("empty prompt")
    if chosen_text == rejected_text:
        return drop("identical responses")
    out.update(prompt=prompt, chosen=chosen_text, rejected=rejected_text)
    return out


def _normalise_for_map(row: dict, src: SourceConfig, code_version: str) -> dict:
    return normalise_row(row, src)  # code_version only feeds the cache fingerprint


def normalise(ds: Dataset, src: SourceConfig, name: str, num_proc: int | None = None) -> Dataset:
    _check_columns(ds, src, name)
    try:
        kept = [c for c in ds.column_names if c == ROW_COLUMN]
        return ds.map(
            _normalise_for_map,
            fn_kwargs=dict(src=src, code_version=CODE_VERSION),
            remove_columns=[c for c in ds.column_names if c not in kept],
            features=Features({**NORMALISED_FEATURES, **{c: ds.features[c] for c in kept}}),
            num_proc=num_proc,
            desc=f"normalising {name}",
        )
    except UnicodeDecodeError as e:  # pyarrow reads bytes as they are; they fail only when read back as text
        raise not_utf8(name, src, e) from None


def not_utf8(name: str, src: SourceConfig, e: UnicodeDecodeError) -> DataSourceError:
    """The error for a source whose rows failed to decode as text: the file and line named."""
    return DataSourceError(
        f"dataset.sources.{name} ({src.path}): {_first_undecodable_line(src.path)} holds text that is not UTF-8 "
        f"({e}); re-encode the file as UTF-8"
    )


def _first_undecodable_line(path: str) -> str:
    """``<file> line <n>``: the first line of a local JSON/JSONL source that is not UTF-8 (looked for only once
    reading failed); "a row" where the source is not such a file."""
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
    for f in files:
        if f.suffix.lower() not in (".json", ".jsonl") or not f.is_file():
            continue
        with f.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{f} line {number}"
    return "a row"


def source_files(src: SourceConfig) -> list[Path]:
    """The local files a source's train and test splits are read from; [] for the synthetic task or a hub id."""
    path = Path(src.path).expanduser()
    if is_synthetic(src) or not path.exists():
        return []
    if path.is_file():
        return [path]
    splits = {src.train_split, read_test_split(src, path)} - {None}
    return sorted({f for split in splits for f in _split_files(path, split, warn=False)})


def fingerprint(src: SourceConfig, files: list[Path] | None = None) -> dict:
    """What a finished or checkpointed run was trained on: ``{"files": {name: SHA-256}, "files_root": folder}`` of
    the source's local files (``files``: ``source_files``, where the caller has them), each named by its path under
    the source's folder (a file source: by its name), so that the same data copied elsewhere (a job's scratch disk,
    say) is the same data; {} for hub or synthetic data."""
    files = source_files(src) if files is None else files
    if not files:
        return {}
    path = Path(src.path).expanduser()
    root = path if path.is_dir() else path.parent
    # named by their place under the source as found, not where a link points (a hub snapshot's files link into
    # its blobs/)
    return {
        "files": {str(f.relative_to(root)): file_sha256(f) for f in files},
        "files_root": str(root.resolve()),
    }


def hub_commit_read(src: SourceConfig, ds: Dataset) -> dict:
    """``{"hub_commit": sha}``: the commit of a hub data set that ``ds`` was read from, else {}. datasets keeps a
    hub data set's Arrow files in a folder named by the commit it downloaded (``<org>___<name>/<config>/<version>/
    <sha>/``, offline reads included), so a run can say which commit it trained on and a resume notice another:
    the data presets pin no revision, and the cache of a connected machine moves on."""
    if is_synthetic(src) or Path(src.path).expanduser().exists():
        return {}
    for cached in ds.cache_files:
        folder = Path(cached.get("filename", "")).parent.name
        if re.fullmatch(r"[0-9a-f]{40}", folder):
            return {"hub_commit": folder}
    return {}


def file_changes(then: dict, now: dict) -> list[str]:
    """How two data reports' ``sources`` differ in their files' fingerprints (``fingerprint``) and their hub
    commits (``hub_commit_read``), as ``dataset.sources.<name>: ...`` lines; a source that recorded no files or
    commit then (synthetic data, or a run older than the record) is not compared."""
    out = []
    for name in sorted(now):
        commits = [(r.get(name) or {}).get("hub_commit") if isinstance(r, dict) else None for r in (then, now)]
        if all(commits) and commits[0] != commits[1]:
            out.append(f"dataset.sources.{name}: the hub data set was read at commit {commits[0][:12]} then, "
                       f"{commits[1][:12]} now")  # fmt: skip
        before = (then.get(name) or {}).get("files") if isinstance(then, dict) else None
        after = (now.get(name) or {}).get("files") or {}
        if not isinstance(before, dict):
            continue
        where = f"dataset.sources.{name} ({(now.get(name) or {}).get('files_root', 'no local files now')})"
        for file in sorted(set(before) | set(after)):
            if file not in after:
                out.append(f"{where}: {file} is no longer read (gone or renamed)")
            elif file not in before:
                out.append(f"{where}: {file} is read now and was not then")
            elif before[file] != after[file]:
                out.append(f"{where}: {file} changed (sha256 {before[file][:12]} then, {after[file][:12]} now)")
    return out


def changes_since_record(then: dict, now: dict, run_dir) -> list[str]:
    """``file_changes`` between a run's record of its sources and ``now``. A source with local files now that the
    record holds no fingerprints of (a run started before they were recorded) cannot be checked: a warning says
    so, and its fingerprints are taken out of ``now``, which a resumed run records, so that the record never
    vouches for files its first steps did not see."""
    unchecked = [
        name
        for name in sorted(now)
        if (now.get(name) or {}).get("files") and not isinstance(((then or {}).get(name) or {}).get("files"), dict)
    ]
    if unchecked:
        log.warning(
            "%s: its record holds no fingerprints of the files of %s (it started before they were recorded), so "
            "they cannot be checked against the data it trained on: make sure they are the same",
            run_dir,
            ", ".join(f"dataset.sources.{n}" for n in unchecked),
        )
    for name in unchecked:
        now[name] = {k: v for k, v in now[name].items() if k not in ("files", "files_root")}
    return file_changes(then, now)


def provenance(path: str, files: list[Path] | None = None) -> dict:
    """``{"provenance": ...}`` from a ``provenance.json`` beside the local data files read (``files``), in the
    source's directory or beside its file (written by ``python -m simpo_exp.generate``), so a run records where
    its data came from; else {}."""
    local = Path(path).expanduser()
    if not local.exists():  # a hub id
        return {}
    folders = [f.parent for f in files or []] + [local if local.is_dir() else local.parent]
    record = next((d / "provenance.json" for d in folders if (d / "provenance.json").is_file()), None)
    if record is None:  # local data without a record
        return {}
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", record, e)
        return {}
    if not isinstance(recorded, dict):  # the generate stage writes a mapping; a list stopped the run's start
        log.warning("cannot read %s: it holds a %s, not the generate stage's record", record, type(recorded).__name__)
        return {}
    return {"provenance": {"file": str(record.resolve()), **recorded}}


def synthetic_task(dcfg: DatasetConfig) -> SyntheticConfig | None:
    """The sort-digits task a data set's prompts come from: ``dataset.synthetic`` when a source is the
    synthetic task itself, else the task recorded in a local source's ``provenance.json`` (the generate stage
    writes it when it sampled the task's prompts), so on-policy rounds keep their held-out test prompts."""
    if any(is_synthetic(s) for s in dcfg.sources.values()):
        return dcfg.synthetic
    return recorded_task([provenance(src.path, source_files(src)) for src in dcfg.sources.values()])


def recorded_task(records: list) -> SyntheticConfig | None:
    """The first readable ``synthetic_task`` among ``{"provenance": ...}`` records (``provenance``'s, or the
    copies a run keeps in its data_report.json's sources); a record of another shape is no task."""
    for record in records:
        task = record.get("provenance", {}).get("synthetic_task") if isinstance(record, dict) else None
        if isinstance(task, dict):
            try:
                return SyntheticConfig(**task)
            except TypeError:
                log.warning("unreadable synthetic_task record %r", task)
    return None


def load_mixture(dcfg: DatasetConfig) -> tuple[DatasetDict, dict]:
    """Load and normalise every source; concatenate them (train shuffled with a fixed seed)."""
    from datasets import concatenate_datasets

    trains, tests, sizes = [], [], {}
    carving = [n for n, src in dcfg.sources.items() if src.test_size is None and carves_test(src)]
    if not carving and dcfg.test_size != DatasetConfig.test_size:
        log.warning(
            "dataset.test_size=%s is not used: no source of the data set carves its test split out of train with it "
            "(each reads a test split or has a test_size of its own)",
            dcfg.test_size,
        )
    for name, src in dcfg.sources.items():
        train, test = load_source(name, src, dcfg)
        # each row keeps its source's name, so that the drops of tokenising are counted per source too
        trains.append(normalise(train, src, name, dcfg.num_proc).add_column(SOURCE_COLUMN, [name] * len(train)))
        tests.append(normalise(test, src, name, dcfg.num_proc).add_column(SOURCE_COLUMN, [name] * len(test)))
        sizes[name] = {"train_rows": len(train), "test_rows": len(test), "fraction": src.fraction}
        sizes[name]["dropped"] = source_drops({"train": trains[-1], "test": tests[-1]}, len(dcfg.sources))[name]
        files = source_files(src)
        sizes[name].update(provenance(src.path, files))
        sizes[name].update(fingerprint(src, files))  # a finished or checkpointed run is not taken for other data
        sizes[name].update(hub_commit_read(src, train))
    train = concatenate_datasets(trains).shuffle(seed=dcfg.shuffle_seed)
    test = concatenate_datasets(tests)
    return DatasetDict(train=train, test=test), sizes


def row_finder(src: SourceConfig, split: str):
    """A function naming where a local source's rows are in its files, from their places in ``split`` ("train" or
    "test") as read (``numbered``): ``train.jsonl line 12`` (JSON lines: the file's line, 1-based, blank lines
    counted), ``data/train-00001-of-00002.parquet row 40`` (0-based in the file); None where the rows are in no local
    file (the hub's cache, the synthetic task) or a file's rows cannot be counted here. A carved test split's places
    are in the train files."""
    path = Path(src.path).expanduser()
    if is_synthetic(src) or not path.exists():
        return None
    if path.is_file():
        files, root = [path], path.parent
    else:
        read_as = src.train_split if split == "train" else (read_test_split(src, path) or src.train_split)
        files, root = _split_files(path, read_as, warn=False), path
    try:
        spans = [(f, _rows_of(f)) for f in files]
    except Exception:  # noqa: BLE001 - a file of another layout (a JSON object with its rows under a key): unnamed
        return None

    def where(place: int) -> str:
        for f, rows in spans:
            if place < len(rows):  # a list holds line numbers (JSON lines), a range row indices
                return f"{f.relative_to(root)} {'line' if isinstance(rows, list) else 'row'} {rows[place]}"
            place -= len(rows)
        return f"row {place} past its files' rows"

    return where


def _rows_of(f: Path):
    """A file's rows as ``row_finder`` names them: a JSON lines file's line numbers (its non-blank lines), else the
    range of its row indices (a parquet file's, a JSON array's)."""
    if f.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return range(pq.ParquetFile(f).metadata.num_rows)
    if f.suffix.lower() == ".json":
        with contextlib.suppress(json.JSONDecodeError):  # else JSON lines under a .json name, as datasets reads it
            rows = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise ValueError(f"{f}: a JSON {type(rows).__name__}, not a list of rows")
            return range(len(rows))
    with open(f, "rb") as lines:
        return [n for n, line in enumerate(lines, 1) if line.strip()]


def source_drops(
    splits: dict[str, Dataset], n_sources: int, name_rows: bool = False, sources: dict | None = None
) -> dict[str, dict]:
    """Each source's dropped rows (the rows' ``source`` column), by split and reason. In a mixture, a source none
    of whose train rows is a usable pair (another schema: ShareGPT's ``human``/``gpt`` roles; every prompt too
    long; a chat template that refuses its rows) is an error, not a run on the other sources alone; one whose
    test rows all drop is warned about (the held-out figures would leave it out). Checked after normalising and
    again after tokenising, where ``name_rows`` logs the first dropped rows' places for each reason: their files
    and lines where ``sources`` (name -> SourceConfig) has them local (``row_finder``)."""
    names = list(dict.fromkeys(n for ds in splits.values() for n in ds[SOURCE_COLUMN]))
    drops = {name: {split: {} for split in splits} for name in names}
    finders = {}  # (source, split) -> row_finder's function: each source's files read once, whatever its reasons
    for split, ds in splits.items():
        rows = Counter(ds[SOURCE_COLUMN])
        places = ds[ROW_COLUMN] if ROW_COLUMN in ds.column_names else [None] * len(ds)
        reasons, shown = Counter(), {}
        for n, r, place in zip(ds[SOURCE_COLUMN], ds["drop_reason"], places):
            if r:
                reasons[n, r] += 1
                shown.setdefault((n, r), []).append(place)
        for (name, reason), count in sorted(reasons.items()):
            drops[name][split][reason] = count
            first = sorted(x for x in shown[name, reason] if x is not None)[:SHOWN_ROWS]
            if first and name_rows:  # where to look: the rows' places in the split as read (a carved test: in train)
                more = ", ..." if count > len(first) else ""
                if (name, split) not in finders:
                    finders[name, split] = row_finder(sources[name], split) if sources and name in sources else None
                where = finders[name, split]  # a sharded folder's running numbers, or a file's blank lines, misled
                places = (
                    f": {', '.join(map(where, first))}{more}"
                    if where is not None
                    else f", rows {', '.join(map(str, first))}{more} (0-based, in the order its files read)"
                )
                log.info("dataset.sources.%s %s: %d rows dropped (%s)%s", name, split, count, reason, places)
        for name in names:
            if n_sources > 1 and rows[name] and sum(drops[name][split].values()) == rows[name]:
                said = (
                    f"dataset.sources.{name}: none of its {rows[name]} {split} rows is a usable pair "
                    f"(dropped: {drops[name][split]})"
                )
                if split == "train":
                    raise DataSourceError(
                        f"{said}; check its columns and format, max_length/max_prompt_length and the chat template, "
                        "or leave it out of the mixture"
                    )
                log.warning("%s; the held-out figures leave this source out", said)
    return drops
