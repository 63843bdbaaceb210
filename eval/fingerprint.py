"""Run fingerprints: what a results file's answers depend on, so runs are never mixed.

A results file (JSON lines, eval/runner.py) is keyed by item id only; resuming it with another
model, prompt, decoding, intervention, question set or scorer would silently reuse answers of a
different run. A `Fingerprint` is a canonical JSON object of everything a run depends on:

    {"benchmark": "chair" | "pope" | ...,
     "model":     {"id", "revision", "config_sha256", "weights_sha256"}   (or {"id", "server"}),
     "prompt":    the prompt (template) sent with every item,
     "decoding":  {"max_new_tokens", "temperature", ...},
     "placement": {"device", "dtype", "device_map"} a local model runs with, the dtype resolved as
                  lvlm.load resolves it (eval.context.Placement; absent with --server: the service
                  places its model): bfloat16 and float32 answers are different runs,
     "interventions": the configs as requested, every parameter (per results file),
     "interventions_resolved": the configs as the model runs them: model-aware values (published,
                  scaled, tuned) filled from the model's facts and profile, so re-tuned or
                  re-shipped values are a different run (absent with --server: the service
                  resolves them),
     "items":     {"count", "sha256"} over (key, prompt, image file name, image SHA-256) of every
                  item: re-rendered images under the same names are another run,
     "scorer":    metric flavour, options, and the annotations by content: the ground truth of
                  the sampled images, synonym table, question files (digests of what is read,
                  never of a path or file name)}

Image bytes are hashed once: `ImageHashes` keeps each file's SHA-256 in a SQLite cache
(`$LVLM_CACHE/image-sha256.sqlite3`, default ~/.cache/lvlm) keyed by absolute path, size and
modification time (ns), so a resumed run over an unchanged 40k-image folder only stats the files.
A file rewritten in place gets a new mtime and is hashed again. Remote images (s3://, gs://, ...)
are identified by their URI.

Its digest is the SHA-256 of the canonical JSON (sorted keys, no whitespace); `short` is the first
12 hex digits, used to name the default output folder, so two different runs never share one.
The first line of every results file is a header {"fingerprint": {...}, "digest": "..."};
reopening the file with a different fingerprint raises `FingerprintMismatch`, whose message lists
each differing field (dotted path, old and new value). Callers outside `eval.compare` (tuning,
cluster evaluation) build one with `Fingerprint.of(...)` / `run_fingerprint` and pass it to
`eval.runner.run(..., fingerprint=fp)` or `ResultsFile(path, fingerprint=fp)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_hallu.eval.errors import EvalError
from lvlm_hallu.eval.report import sha256_file

HEADER_KEY = "fingerprint"
LARGE_FILE = 512 << 20  # weight files above this are digested from size + head + tail (see _file_digest)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class FingerprintMismatch(EvalError):
    """A results file was written by a run with another fingerprint."""


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace; tuples become lists; unknown objects their str."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """A canonical description of a run; equal fingerprints mean the answers are interchangeable."""

    fields: Mapping[str, Any]

    @classmethod
    def of(cls, **fields: Any) -> Fingerprint:
        return cls(json.loads(canonical(fields)))  # normalise tuples, keys and numbers once

    @property
    def digest(self) -> str:
        return sha256_text(canonical(self.fields))

    @property
    def short(self) -> str:
        return self.digest[:12]

    def without(self, *keys: str) -> Fingerprint:
        return Fingerprint({k: v for k, v in self.fields.items() if k not in keys})

    def extend(self, **fields: Any) -> Fingerprint:
        return Fingerprint.of(**{**self.fields, **fields})

    def header(self) -> dict[str, Any]:
        return {HEADER_KEY: dict(self.fields), "digest": self.digest}

    def differences(self, other: Fingerprint) -> list[str]:
        """One line per differing leaf: `path: <this> != <other>` (values shortened)."""
        mine, theirs = _flatten(self.fields), _flatten(other.fields)
        lines = []
        for path in sorted(set(mine) | set(theirs)):
            a, b = mine.get(path, "<absent>"), theirs.get(path, "<absent>")
            if a != b:
                lines.append(f"{path}: {_short(a)} != {_short(b)}")
        return lines


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by path: {"a": {"b": [1, {"c": 2}]}} -> {"a.b[0]": 1, "a.b[1].c": 2}."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix or "(root)"] = value
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) and value == "<absent>" else canonical(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_header(header: Mapping[str, Any] | None, expected: Fingerprint, path: str | Path,
                 ignore: Sequence[str] = ()) -> None:
    """Raise FingerprintMismatch unless `header` (a results file's first line) has `expected`.

    `ignore`: fields left out of the comparison on both sides (fields not known yet, e.g. the
    model-aware intervention values before the model is loaded; they are checked later).
    """
    if header is None:
        raise FingerprintMismatch(
            f"{path} has results but no run fingerprint (written by an older version); its answers "
            "cannot be matched to this run. Use another --out, or omit --out for a folder per fingerprint."
        )
    found = Fingerprint(header.get(HEADER_KEY) or {}).without(*ignore)
    expected = expected.without(*ignore)
    if found.digest == expected.digest:
        return
    diff = "\n  ".join(found.differences(expected)) or "(same fields, different digest)"
    raise FingerprintMismatch(
        f"{path} belongs to another run; refusing to resume it. Differences (file != this run):\n  {diff}\n"
        "Use another --out, or omit --out to get a folder per fingerprint."
    )


# ---------------------------------------------------------------------------------------------
# Pieces of a fingerprint


REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://", "http://", "https://")


def image_cache_path() -> Path:
    """`$LVLM_CACHE/image-sha256.sqlite3` (default ~/.cache/lvlm)."""
    return Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm")) / "image-sha256.sqlite3"


class ImageHashes:
    """SHA-256 of image files, cached by (absolute path, size, mtime in ns) in a SQLite file.

    `digests(paths)` stats every file, reads the cached digests of unchanged files in one query per
    chunk and hashes only new or changed files (threads: hashlib releases the GIL). A cache that
    cannot be opened or written (read-only home) only costs speed: the files are hashed anyway.
    """

    CHUNK = 900  # below SQLite's default limit of host parameters per statement

    def __init__(self, path: str | Path | None = None, *, threads: int | None = None):
        self.path = Path(path) if path is not None else image_cache_path()
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.hashed = 0  # files hashed by the last `digests` call (the rest came from the cache)

    def _connect(self) -> sqlite3.Connection | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("CREATE TABLE IF NOT EXISTS images (path TEXT PRIMARY KEY, size INTEGER, "
                       "mtime_ns INTEGER, sha256 TEXT)")
            return db
        except (OSError, sqlite3.Error):
            return None

    def digests(self, paths: Sequence[str | Path]) -> list[str]:
        """The SHA-256 of each file, in order (FileNotFoundError names a missing file)."""
        keys = []
        for p in paths:
            absolute = os.path.abspath(p)
            try:
                st = os.stat(absolute)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"image not found: {p}") from err
            keys.append((absolute, st.st_size, st.st_mtime_ns))
        db = self._connect()
        known: dict[str, tuple[int, int, str]] = {}
        if db is not None:
            unique = sorted({k[0] for k in keys})
            for i in range(0, len(unique), self.CHUNK):
                chunk = unique[i : i + self.CHUNK]
                rows = db.execute(f"SELECT path, size, mtime_ns, sha256 FROM images WHERE path IN "
                                  f"({','.join('?' * len(chunk))})", chunk)
                known.update((path, (size, mtime, digest)) for path, size, mtime, digest in rows)
        fresh = sorted({k for k in keys if known.get(k[0], (None, None))[:2] != k[1:]})
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            hashed = list(pool.map(lambda k: sha256_file(k[0]), fresh))
        self.hashed = len(fresh)
        for (path, size, mtime), digest in zip(fresh, hashed, strict=True):
            known[path] = (size, mtime, digest)
        if db is not None:
            try:
                with db:
                    db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?)",
                                   [(path, size, mtime, digest) for (path, size, mtime), digest in zip(fresh, hashed)])
            except sqlite3.Error:
                pass  # a read-only cache: correct, only slower next time
            finally:
                db.close()
        return [known[k[0]][2] for k in keys]


def items_digest(items: Iterable[Any], hashes: ImageHashes | None = None) -> dict[str, Any]:
    """{"count", "sha256"} over (key, prompt, image file name, image SHA-256) of every item, in order.

    Local images are digested by content (`ImageHashes`, cached); a remote URI stands for itself.
    """
    items = list(items)
    local = [it.image for it in items if it.image and not str(it.image).startswith(REMOTE_SCHEMES)]
    try:
        by_path = dict(zip(local, (hashes or ImageHashes()).digests(local), strict=True)) if local else {}
    except FileNotFoundError as err:
        raise EvalError(f"{err} (every image of a run is read for its fingerprint)") from err
    h = hashlib.sha256()
    for it in items:
        image = Path(it.image).name if it.image else ""
        content = by_path.get(it.image, str(it.image or ""))
        h.update(canonical([it.key, it.prompt, image, content]).encode("utf-8") + b"\n")
    return {"count": len(items), "sha256": h.hexdigest()}


def _file_digest(path: Path) -> str:
    """SHA-256 of a file; a Hugging Face cache blob is named by its SHA-256 already (LFS files).

    Files above LARGE_FILE (multi-GB shards of local checkpoints) are digested from their size and
    first and last 16 MiB, so fingerprinting a 7B checkpoint takes a second, not a minute.
    """
    real = path.resolve()
    if real != path.absolute() and real.parent.name == "blobs" and len(real.name) == 64:
        return real.name
    size = real.stat().st_size
    if size <= LARGE_FILE:
        return sha256_file(real)
    h = hashlib.sha256()
    with open(real, "rb") as f:
        h.update(f"size={size}".encode())
        h.update(f.read(16 << 20))
        f.seek(size - (16 << 20))
        h.update(f.read(16 << 20))
    return "sampled:" + h.hexdigest()


def checkpoint_digests(folder: str | Path) -> dict[str, str | None]:
    """{"config_sha256", "weights_sha256"} of a checkpoint folder (weights over all weight files)."""
    folder = Path(folder)
    config = folder / "config.json"
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    combined = hashlib.sha256()
    for p in weights:
        combined.update(f"{p.name}:{_file_digest(p)}\n".encode())
    return {
        "config_sha256": _file_digest(config) if config.is_file() else None,
        "weights_sha256": combined.hexdigest() if weights else None,
    }


def model_identity(name: str, *, revision: str | None = None, server: str | None = None) -> dict[str, Any]:
    """What identifies a model's weights: id plus config and weights digests where they can be read.

    "shapes" is the embedded checkpoint; the random-weight test models are built by code (their id
    and the package version identify them); a local folder or a cached hub id is digested; a model
    behind `server` is identified by its id and the server URL.
    """
    if server:
        return {"id": name, "server": server}
    from lvlm_hallu.eval.report import package_version

    from lvlm_hallu.lvlm.shapes import embedded_dir

    folder: Path | None = embedded_dir(name)
    if folder is None and os.path.isdir(name):
        folder = Path(name)
    elif folder is None:
        try:
            from lvlm_hallu.lvlm import tiny
        except ImportError:  # pragma: no cover - eval installed without the model stack
            tiny = None
        if tiny is not None and name in tiny.ALL:
            return {"id": name, "built_by": f"lvlm.tiny ({package_version()})"}
        from lvlm_hallu.lvlm.loader import hub_snapshot

        folder = hub_snapshot(name, revision)
    identity: dict[str, Any] = {"id": name, "revision": revision}
    if folder is not None and folder.is_dir():
        identity.update(checkpoint_digests(folder))
    else:
        identity.update(config_sha256=None, weights_sha256=None)
    return identity
