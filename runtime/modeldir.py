"""Fetch a model *directory* (Hugging Face style), verify it against one digest, cache it.

Generative models are directories (``config.json``, ``*.safetensors`` shards, tokenizer
files) at ``s3://bucket/prefix/``, ``http(s)://host/path/`` or ``file:///path/`` (a PVC
mount, also as a plain path). The LLM runtime calls :func:`fetch_dir` once at startup and
hands :attr:`Fetched.path` to the engine. It runs in the engine's own virtualenv, so this
module imports only the standard library, urllib3 and certifi (through :mod:`.storage`) and, lazily,
boto3 for ``s3://``.

**One digest for a directory.** The directory's root holds ``SHA256SUMS`` in the format
``sha256sum`` writes: ``<64 hex>  <relative posix path>`` per file, every file but itself.
The *canonical manifest* is those lines re-written as ``f"{sha}  {path}\\n"`` sorted by
path (code point order, which is ``LC_ALL=C sort``); the model's *digest* is the sha256 of
its UTF-8 bytes. So this shell line gives the same digest::

    find . -type f ! -name SHA256SUMS | sed 's|^\\./||' | LC_ALL=C sort \\
        | xargs sha256sum | sha256sum

Without a ``SHA256SUMS``, ``file://`` and ``s3://`` directories are listed instead (every
regular file, recursively, but ``SHA256SUMS`` and any path with a part that starts with
``.``); ``http(s)://`` cannot be listed, so there it is required: ``modelyard digest DIR``
(:func:`main`) writes one.

**Serving.** ``file://`` is verified in place (every listed file hashed, no file left
unlisted) and served there. Remote directories are copied into a :class:`NodeCache`, a
node-local directory shared by every pod on the node (the chart's nodeCache), content-addressed:
the verified copy of digest D is ``<root>/D/``, holding exactly the manifest's files plus
its canonical ``SHA256SUMS``. A download lands in a temporary sibling, every file verified
as it lands, and is renamed into place, so a half-written entry is never visible. A hit
re-hashes every file before use; bad ones are logged and fetched again (``repaired``),
never served. When the digest is known in advance an intact entry is served without a
single request to the origin.

**Sharing and eviction.** Locks are ``fcntl.flock`` on files under ``<root>/.locks/``,
so they die with the process that holds them:

* ``D.lock``: exclusive while D is downloaded or repaired, shared while it is verified;
  a second process asking for D waits, then finds a hit.
* ``D.inuse``: shared for as long as a server uses D (:class:`InUse`, kept by
  :class:`Fetched`); the evictor skips any entry it cannot lock exclusively.
* ``cache.lock``: exclusive while temporary directories are made and while evicting.

The directory's mtime is its last use. After each fetch, least recently used entries are
removed until the cache is within ``max_bytes`` (never the entry just fetched, nor one in
use). Temporary directories (``.tmp-*``) hold a flock on themselves while alive; the
evictor removes those left by a process that died.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

from modelyard.runtime.errors import ChecksumMismatch, StorageError
from modelyard.runtime.storage import FETCHERS, FetchOptions, sha256_of, verify_file

__all__ = [
    "MANIFEST",
    "Fetched",
    "InUse",
    "NodeCache",
    "Source",
    "canonical",
    "digest",
    "fetch_dir",
    "main",
    "manifest_of",
    "parse_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST = "SHA256SUMS"
Source = Literal["in-place", "cache-hit", "download", "repaired"]

_WORKERS = 4  # files downloaded or hashed at once
_DEFAULT_OPTIONS = FetchOptions()
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.*)")
_T = TypeVar("_T")
_R = TypeVar("_R")


# --- the manifest ------------------------------------------------------------------------


def _bad_path(path: str) -> str | None:
    """Why ``path`` cannot name a file of a model directory, or None when it can."""
    if not path:
        return "the path is empty"
    if path.startswith("/"):
        return "the path is absolute"
    if "\\" in path or "\n" in path or "\r" in path:
        return "the path has a backslash or a line break"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "the path is not normalised (an empty, '.' or '..' part)"
    if path == MANIFEST:
        return f"{MANIFEST} does not list itself"
    return None


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/"))


def parse_manifest(text: str, where: str = MANIFEST) -> dict[str, str]:
    """Path -> sha256 from ``sha256sum`` output; a bad line is a StorageError naming it."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        try:
            sha, path = _parse_line(line, entries)
        except ValueError as problem:
            raise StorageError(f"bad manifest {where}, line {number}: {problem}: {line!r}"
                               ) from None
        entries[path] = sha
    if not entries:
        raise StorageError(f"bad manifest {where}: it lists no files")
    _check_tree(entries, where)
    return entries


def _parse_line(line: str, seen: Mapping[str, str]) -> tuple[str, str]:
    match = _LINE.fullmatch(line)
    if match is None:
        raise ValueError("not '<64 hex digits>  <path>' as sha256sum writes")
    sha, path = match.groups()
    problem = _bad_path(path) or ("the path is listed twice" if path in seen else None)
    if problem is not None:
        raise ValueError(problem)
    return sha.lower(), path


def _check_tree(paths: Iterable[str], where: str) -> None:
    """No path may be both a file and a directory (``a`` and ``a/b``)."""
    files = set(paths)
    for path in sorted(files):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in files:
                raise StorageError(f"bad manifest {where}: {parent!r} is listed as a file "
                                   f"and as the directory of {path!r}")


def canonical(entries: Mapping[str, str]) -> str:
    """The canonical manifest: one ``"{sha}  {path}\\n"`` per file, sorted by path."""
    return "".join(f"{entries[path]}  {path}\n" for path in sorted(entries))


def digest(entries: Mapping[str, str]) -> str:
    """The model's digest: the sha256 hex of its canonical manifest."""
    return hashlib.sha256(canonical(entries).encode("utf-8")).hexdigest()


def _list_local(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (symlinks to files count), posix paths,
    sorted; ``SHA256SUMS`` at the root and hidden parts left out."""
    found: list[str] = []
    for top, dirs, files in os.walk(directory):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        base = Path(top).relative_to(directory)
        for name in files:
            path = (base / name).as_posix()
            if name.startswith(".") or path == MANIFEST or not (Path(top) / name).is_file():
                continue
            problem = _bad_path(path)
            if problem is not None:
                raise StorageError(f"cannot serve {directory / path}: {problem}")
            found.append(path)
    return sorted(found)


def manifest_of(directory: Path, *, workers: int = _WORKERS) -> dict[str, str]:
    """Hash every file of ``directory`` (as listed above): path -> sha256."""
    paths = _list_local(directory)
    if not paths:
        raise StorageError(f"no files to serve in {directory}")
    hashes = _parallel(lambda path: sha256_of(directory / path), paths, workers)
    return dict(zip(paths, hashes, strict=True))


def write_manifest(directory: Path) -> str:
    """Write ``directory/SHA256SUMS`` (canonical, atomically) and return the digest."""
    entries = manifest_of(directory)
    _write_atomically(directory / MANIFEST, canonical(entries))
    return digest(entries)


def _write_atomically(path: Path, text: str) -> None:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _read_manifest(path: Path, where: str) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StorageError(f"bad manifest {where}: it is not UTF-8 text") from None
    except OSError as error:
        raise StorageError(f"cannot read {where}: {error.strerror}") from None
    return parse_manifest(text, where)


# --- helpers -----------------------------------------------------------------------------


def _parallel(work: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
    """``[work(item) ...]`` on up to ``workers`` threads; the first error cancels the rest."""
    if workers <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures: list[Future[_R]] = [pool.submit(work, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _problems(directory: Path, entries: Mapping[str, str], paths: Sequence[str],
              workers: int) -> dict[str, str]:
    """Path -> what is wrong with it in ``directory``, for those of ``paths`` not intact."""
    def check(path: str) -> str | None:
        file = directory / path
        if not file.is_file():
            return "is missing"
        actual = sha256_of(file)
        if actual != entries[path]:
            return f"has sha256 {actual}, but {MANIFEST} says {entries[path]}"
        return None

    found = _parallel(check, paths, workers)
    return {path: problem for path, problem in zip(paths, found, strict=True) if problem}


def _expect(uri: str, actual: str, expected: str | None) -> str:
    if expected is not None and actual != expected:
        raise ChecksumMismatch(f"refusing to serve {uri}: its manifest digest is {actual}, "
                               f"but {expected} was expected")
    return actual


def _size(directory: Path, paths: Iterable[str]) -> int:
    return sum((directory / path).stat().st_size for path in paths)


def _tree_size(directory: Path) -> int:
    return sum(Path(top, name).stat().st_size
               for top, _, files in os.walk(directory) for name in files)


# --- locks -------------------------------------------------------------------------------


def _flock(path: Path, operation: int, *, create: bool = True) -> int | None:
    """Open ``path`` and ``flock`` it: the descriptor, or None if ``LOCK_NB`` found it held
    (or it is absent and ``create`` is false). A lock file unlinked by the evictor while we
    waited is locked afresh, so a lock always belongs to the file at ``path``."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            if create:
                raise
            return None
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        if not create:
            return None


@contextlib.contextmanager
def _holding(path: Path, operation: int) -> Iterator[None]:
    fd = _flock(path, operation)
    assert fd is not None  # a blocking flock always ends holding the lock
    try:
        yield
    finally:
        os.close(fd)


class InUse:
    """A shared flock on ``.locks/<digest>.inuse``: while it is held, no process evicts
    the entry. It is a raw descriptor, so dropping the object keeps it: it lasts until
    :meth:`release` (or the ``with`` block's end) or until the process exits, when the
    kernel drops it. Child processes do not inherit it (a supervisor that starts the
    engine keeps it for both); a server that ``exec``\\s the engine first calls
    ``os.set_inheritable(in_use.fileno(), True)``.
    """

    def __init__(self, fd: int, digest: str) -> None:
        self._fd: int | None = fd
        self.digest = digest

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"the in-use lock of {self.digest} was released")
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InUse:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


# --- the node cache ----------------------------------------------------------------------


class NodeCache:
    """The node-local, content-addressed, size-bounded cache of verified model directories.

    Shared by every process on the node: all coordination is ``flock`` under ``root``.
    ``max_bytes`` None means no bound.
    """

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def entry(self, digest: str) -> Path:
        """Where the verified copy of ``digest`` lives (whether or not it is there)."""
        if not _HEX64.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest

    def entries(self) -> list[Path]:
        """The complete entries, least recently used first."""
        if not self.root.is_dir():
            return []
        found: list[tuple[int, str, Path]] = []
        for path in self.root.iterdir():
            if _HEX64.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    status = path.stat()
                    if stat.S_ISDIR(status.st_mode):
                        found.append((status.st_mtime_ns, path.name, path))
        return [path for _, _, path in sorted(found)]

    def in_use(self, digest: str) -> InUse:
        """Keep ``digest``'s entry from eviction until the returned lock is released."""
        self.entry(digest)  # validates the name
        fd = _flock(self._lock_file(f"{digest}.inuse"), fcntl.LOCK_SH)
        assert fd is not None
        return InUse(fd, digest)

    def fetching(self, digest: str, *,
                 shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """Exclusive while ``digest`` is written, shared while it is only read."""
        self.entry(digest)
        return _holding(self._lock_file(f"{digest}.lock"),
                        fcntl.LOCK_SH if shared else fcntl.LOCK_EX)

    @contextlib.contextmanager
    def temp_dir(self) -> Iterator[Path]:
        """A fresh ``.tmp-*`` directory under the root, removed on exit; it holds a flock
        on itself, so only one left by a dead process is ever cleaned up by another."""
        with self._exclusive():
            path = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)

    def discard(self, entry: Path) -> None:
        """Remove a damaged entry (its caller holds its ``fetching`` lock)."""
        with self._exclusive():
            self._remove(entry)

    def _remove(self, entry: Path) -> None:
        """Rename ``entry`` away, so it vanishes at once, then delete it; the caller holds
        ``cache.lock``, so no one cleans up the temporary name meanwhile."""
        trash = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        os.rename(entry, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)

    def evict(self, keep: str | None = None) -> list[str]:
        """Clean up after dead processes, then remove least recently used entries (not
        ``keep``, none in use) until the cache is within ``max_bytes``; the evicted digests.
        """
        with self._exclusive():
            self._remove_stale_temps()
            evicted = self._evict_lru(keep) if self.max_bytes is not None else []
            self._remove_orphan_locks()
        return evicted

    def _evict_lru(self, keep: str | None) -> list[str]:
        assert self.max_bytes is not None
        entries = self.entries()
        sizes = {path.name: _tree_size(path) for path in entries}
        total = sum(sizes.values())
        evicted: list[str] = []
        for path in entries:
            if total <= self.max_bytes:
                break
            if path.name == keep or not self._remove_if_idle(path):
                continue
            total -= sizes[path.name]
            evicted.append(path.name)
            log.info("evicted %s from the node cache %s (%d bytes, least recently used); "
                     "%d bytes remain of %d", path.name, self.root, sizes[path.name], total,
                     self.max_bytes)
        if total > self.max_bytes:
            log.warning("the node cache %s holds %d bytes, over its %d: the rest is in use",
                        self.root, total, self.max_bytes)
        return evicted

    def _remove_if_idle(self, entry: Path) -> bool:
        """Remove ``entry`` if no process uses, fetches or verifies it (else False)."""
        locks = []
        try:
            for suffix in (".inuse", ".lock"):
                fd = _flock(self._lock_file(entry.name + suffix), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if fd is None:
                    return False
                locks.append(fd)
            self._remove(entry)
            for suffix in (".inuse", ".lock"):  # unlinked while held: see _flock
                self._lock_file(entry.name + suffix).unlink(missing_ok=True)
            return True
        finally:
            for fd in locks:
                os.close(fd)

    def _remove_stale_temps(self) -> None:
        for path in self.root.glob(".tmp-*"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process works in it
            finally:
                os.close(fd)
            log.info("removing %s, left by a process that stopped mid-way", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _remove_orphan_locks(self) -> None:
        """Lock files of digests with no entry, unless a process holds them."""
        for path in (self.root / ".locks").glob("*.*"):
            name, _, suffix = path.name.partition(".")
            if suffix not in ("lock", "inuse") or (self.root / name).exists():
                continue
            fd = _flock(path, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
            if fd is not None:
                path.unlink(missing_ok=True)
                os.close(fd)

    def _lock_file(self, name: str) -> Path:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return locks / name

    def _exclusive(self) -> contextlib.AbstractContextManager[None]:
        return _holding(self._lock_file("cache.lock"), fcntl.LOCK_EX)


# --- origins -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """A remote model directory: how to name, download and (maybe) list its files."""

    uri: str  # ends with "/"
    scheme: str
    options: FetchOptions
    lister: Callable[[], list[str]] | None  # None: it cannot be listed (http)

    def file_uri(self, path: str) -> str:
        # storage's s3 fetcher takes the key as it stands; http needs it quoted.
        return self.uri + (path if self.scheme == "s3" else urllib.parse.quote(path))

    def download(self, path: str, dest: Path) -> str | None:
        """The file ``path`` to ``dest``; its sha256 if hashed as it streamed."""
        return FETCHERS[self.scheme](self.file_uri(path), dest, self.options)

    def manifest(self) -> dict[str, str] | None:
        """The parsed ``SHA256SUMS``, or None where there is none but a listing."""
        with tempfile.TemporaryDirectory(prefix="modelyard-") as scratch:
            local = Path(scratch) / MANIFEST
            try:
                self.download(MANIFEST, local)
            except StorageError as error:
                if not _is_missing(error):
                    raise
                if self.lister is None:
                    raise StorageError(
                        f"{self.uri} has no {MANIFEST}: an {self.scheme} directory cannot be "
                        f"listed, so it must carry its manifest. Run `modelyard digest DIR` "
                        f"(or `python -m modelyard.runtime.modeldir DIR`) on the model "
                        f"directory, upload the {MANIFEST} it writes next to the files, and "
                        f"use the digest it prints as the model's sha256") from None
                log.info("%s has no %s: listing it instead", self.uri, MANIFEST)
                return None
            return _read_manifest(local, self.file_uri(MANIFEST))


def _is_missing(error: StorageError) -> bool:
    """Whether a fetcher's error says the object does not exist."""
    return re.search(r"HTTP (404|410)\b|: (NoSuchKey|404)$", str(error)) is not None


def _origin(uri: str, options: FetchOptions) -> _Origin:
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme not in FETCHERS:
        raise StorageError(f"unsupported URI scheme {scheme!r} in {uri} "
                           f"({', '.join(['file', *FETCHERS])})")
    if not parsed.netloc:
        raise StorageError(f"no {'bucket' if scheme == 's3' else 'host'} in {uri}")
    base = uri if uri.endswith("/") else uri + "/"
    lister = (lambda: _list_s3(base, options)) if scheme == "s3" else None
    return _Origin(base, scheme, options, lister)


def _list_s3(uri: str, options: FetchOptions) -> list[str]:
    """The model files under an ``s3://bucket/prefix/``: relative paths, sorted."""
    import boto3  # type: ignore[import-untyped]
    import botocore.config  # type: ignore[import-untyped]
    import botocore.exceptions  # type: ignore[import-untyped]

    parsed = urllib.parse.urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    config = botocore.config.Config(
        retries={"max_attempts": options.attempts, "mode": "standard"},
        connect_timeout=10, read_timeout=60)
    client = boto3.client("s3", config=config)  # AWS_* variables, AWS_ENDPOINT_URL
    found: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix):
            for item in page.get("Contents", []):
                path = str(item["Key"])[len(prefix):]
                if not path or path.endswith("/") or path == MANIFEST or _hidden(path):
                    continue
                problem = _bad_path(path)
                if problem is not None:
                    raise StorageError(f"cannot serve s3://{bucket}/{item['Key']}: {problem}")
                found.append(path)
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "error")
        raise StorageError(f"cannot list {uri}: {code}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise StorageError(f"cannot list {uri}: {error}") from None
    if not found:
        raise StorageError(f"no files to serve under {uri}")
    _check_tree(found, uri)
    return sorted(found)


def _download(origin: _Origin, entries: Mapping[str, str] | None, directory: Path,
              paths: Sequence[str], workers: int) -> int:
    """Download ``paths`` into ``directory``, each verified against ``entries`` (when
    known) as it lands; the bytes downloaded."""
    def one(path: str) -> int:
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        written = origin.download(path, target)
        if entries is not None:
            actual = written or sha256_of(target)
            if actual != entries[path]:
                raise ChecksumMismatch(
                    f"refusing to serve {origin.uri}: its file {path} has sha256 {actual}, "
                    f"but its {MANIFEST} says {entries[path]}")
        log.debug("fetched %s", origin.file_uri(path))
        return target.stat().st_size

    return sum(_parallel(one, paths, workers))


def _download_listed(origin: _Origin, directory: Path, workers: int) -> dict[str, str]:
    """An unlisted-manifest directory: download every listed file, then hash them."""
    assert origin.lister is not None
    _download(origin, None, directory, origin.lister(), workers)
    return manifest_of(directory, workers=workers)


# --- fetching ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """A verified model directory, ready for the engine.

    Keep it (or its ``with`` block) open while the engine reads ``path``: for a cached
    copy it holds the entry's :class:`InUse` lock, which keeps it from eviction.
    """

    path: Path
    digest: str
    source: Source
    bytes: int  # the model's size: every file of its manifest
    downloaded: int  # bytes fetched from the origin this time
    seconds: float
    in_use: InUse | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        if self.in_use is not None:
            self.in_use.release()

    def __enter__(self) -> Fetched:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def fetch_dir(uri: str, cache: NodeCache | Path, sha256: str | None = None, *,
              options: FetchOptions = _DEFAULT_OPTIONS, workers: int = _WORKERS) -> Fetched:
    """The model directory at ``uri``, verified against the digest ``sha256`` (if given)."""
    started = time.monotonic()
    expected = _expected(sha256)
    local = _local_path(uri)
    if local is not None:
        fetched = _in_place(local, uri, expected, workers)
    else:
        node = cache if isinstance(cache, NodeCache) else NodeCache(Path(cache))
        fetched = _Remote(_origin(uri, options), node, workers).fetch(expected)
    fetched = replace(fetched, seconds=time.monotonic() - started)
    _log_fetch(uri, fetched)
    return fetched


def fetch_file(uri: str, cache: NodeCache, sha256: str | None = None, *,
               options: FetchOptions = _DEFAULT_OPTIONS) -> Fetched:
    """A single-file model (the tensor runtime's) at a remote ``uri``, through the node
    cache like a directory: one process per node downloads it while the others wait on its
    lock and then find it; it is verified against ``sha256`` (when given) on every use, a
    copy that fails is fetched again and never served; it is held in use while the server
    runs and evicted least recently used with the directories.

    Its entry is keyed by the sha256 of the URI (the file's own digest may not be known):
    ``<root>/<sha256(uri)>/<file name>``. ``Fetched.digest`` is ``sha256`` (or "")."""
    started = time.monotonic()
    expected = _expected(sha256)
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    download = FETCHERS.get(scheme)
    if download is None:
        raise StorageError(f"unsupported URI scheme {scheme!r} in {uri} "
                           f"({', '.join(['file', *FETCHERS])})")
    key = hashlib.sha256(uri.encode()).hexdigest()
    entry = cache.entry(key)
    name = Path(urllib.parse.urlparse(uri).path).name or "model"
    in_use = cache.in_use(key)
    try:
        source: Source = "download"
        with cache.fetching(key):
            if (entry / name).is_file():
                try:
                    verify_file(entry / name, uri, expected)
                    source = "cache-hit"
                except ChecksumMismatch as error:
                    log.warning("the cached copy of %s is damaged (%s); fetching it again",
                                uri, error)
                    cache.discard(entry)
            elif entry.exists():
                cache.discard(entry)  # not an entry of this kind: never served
            if source == "download":
                with cache.temp_dir() as scratch:
                    written = download(uri, scratch / name, options)
                    verify_file(scratch / name, uri, expected, written)
                    os.chmod(scratch, 0o755)  # mkdtemp's 0o700 would hide it from others
                    os.rename(scratch, entry)
        os.utime(entry)  # its last use, for the LRU
        size = (entry / name).stat().st_size
    except BaseException:
        in_use.release()
        raise
    try:
        cache.evict(keep=key)
    except OSError as error:  # the model is fine; the cache may grow past its bound
        log.warning("cannot evict from the node cache %s: %s", cache.root, error)
    fetched = Fetched(entry / name, expected or "", source,
                      size, size if source == "download" else 0,
                      time.monotonic() - started, in_use)
    _log_fetch(uri, fetched)
    return fetched


def writable_cache(root: Path) -> Path:
    """The node's cache, or, when this pod cannot write there (the node's directory not
    prepared yet), a cache of the pod's own: slower to start, never a failure."""
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
    if os.access(root, os.W_OK | os.X_OK):
        return root
    own = Path(os.environ.get("HOME") or tempfile.gettempdir()) / "models"
    log.warning("cannot write the node's model cache %s: using the pod's own %s (the model "
                "is fetched for this pod alone)", root, own)
    return own


def _expected(sha256: str | None) -> str | None:
    if sha256 is None or not sha256.strip():
        return None
    expected = sha256.strip().lower()
    if not _HEX64.fullmatch(expected):
        raise StorageError(f"the expected digest {sha256!r} is not 64 hex digits "
                           f"(`modelyard digest DIR` prints a model directory's digest)")
    return expected


def _local_path(uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme.lower() == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def _in_place(directory: Path, uri: str, expected: str | None, workers: int) -> Fetched:
    if not directory.is_dir():
        raise StorageError(f"model directory not found: {directory}")
    listed = directory / MANIFEST
    if listed.is_file():
        entries = _read_manifest(listed, str(listed))
        actual = _expect(uri, digest(entries), expected)
        problems = _problems(directory, entries, sorted(entries), workers)
        problems.update({path: f"is not listed in {MANIFEST}"
                         for path in _list_local(directory) if path not in entries})
        if problems:
            raise ChecksumMismatch(f"refusing to serve {uri}: " + "; ".join(
                f"{path} {problem}" for path, problem in sorted(problems.items())))
    else:
        entries = manifest_of(directory, workers=workers)
        actual = _expect(uri, digest(entries), expected)
    return Fetched(directory, actual, "in-place", _size(directory, entries), 0, 0.0)


def _entry_manifest(entry: Path, wanted: str) -> dict[str, str] | None:
    """A cache entry's own manifest, if it is there and names ``wanted``."""
    try:
        entries = _read_manifest(entry / MANIFEST, str(entry / MANIFEST))
    except StorageError:
        return None
    return entries if digest(entries) == wanted else None


@dataclass
class _Remote:
    """One fetch of a remote directory into the node cache."""

    origin: _Origin
    cache: NodeCache
    workers: int
    _asked: tuple[dict[str, str] | None] | None = None  # the origin's answer, once asked

    def manifest(self) -> dict[str, str] | None:
        """The origin's manifest (None: list it), asked at most once."""
        if self._asked is None:
            self._asked = (self.origin.manifest(),)
        return self._asked[0]

    def fetch(self, expected: str | None) -> Fetched:
        """Resolve the digest, then serve its entry, holding its in-use lock throughout."""
        with contextlib.ExitStack() as stack:
            wanted, entries, staged = expected, None, None
            if wanted is None or not self.cache.entry(wanted).is_dir():
                entries = self.manifest()
                if entries is not None:
                    wanted = _expect(self.origin.uri, digest(entries), expected)
                elif wanted is None:  # no manifest, no digest: download to learn it
                    staged = stack.enter_context(self.cache.temp_dir())
                    entries = _download_listed(self.origin, staged, self.workers)
                    wanted = digest(entries)
            in_use = self.cache.in_use(wanted)
            try:
                source, downloaded = self._obtain(wanted, entries, staged)
                entry = self.cache.entry(wanted)
                os.utime(entry)  # its last use, for the LRU
                size = _size(entry, _entry_manifest(entry, wanted) or {})
            except BaseException:
                in_use.release()
                raise
        try:
            self.cache.evict(keep=wanted)
        except OSError as error:  # the model is fine; the cache may grow past its bound
            log.warning("cannot evict from the node cache %s: %s", self.cache.root, error)
        return Fetched(entry, wanted, source, size, downloaded, 0.0, in_use)

    def _obtain(self, wanted: str, entries: dict[str, str] | None,
                staged: Path | None) -> tuple[Source, int]:
        """Serve ``wanted`` from the cache, repaired if need be, or download it into place."""
        entry = self.cache.entry(wanted)
        suspects: list[str] | None = None
        with self.cache.fetching(wanted, shared=True):
            held = _entry_manifest(entry, wanted) if entry.is_dir() else None
            if held is not None:
                suspects = sorted(_problems(entry, held, sorted(held), self.workers))
                if not suspects:
                    return "cache-hit", 0 if staged is None else _tree_size(staged)
        with self.cache.fetching(wanted):
            held = _entry_manifest(entry, wanted) if entry.is_dir() else None
            if held is not None:  # another process may have repaired (or installed) it since
                problems = _problems(entry, held, suspects or sorted(held), self.workers)
                if not problems:
                    return "cache-hit", 0
                for path, problem in sorted(problems.items()):
                    log.warning("the cached copy of %s is damaged: %s %s; fetching it again",
                                wanted, path, problem)
                return "repaired", self._repair(entry, held, sorted(problems))
            if entry.exists():
                log.warning("the cached copy of %s has a damaged %s; fetching it all again",
                            wanted, MANIFEST)
                self.cache.discard(entry)
            return "download", self._install(wanted, entries, staged)

    def _repair(self, entry: Path, entries: dict[str, str], paths: list[str]) -> int:
        """Fetch ``paths`` again, verified, then move each over its damaged copy."""
        with self.cache.temp_dir() as scratch:
            downloaded = _download(self.origin, entries, scratch, paths, self.workers)
            for path in paths:
                (entry / path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(scratch / path, entry / path)
        return downloaded

    def _install(self, wanted: str, entries: dict[str, str] | None,
                 staged: Path | None) -> int:
        """Download (or take the staged copy) into a temporary sibling, then rename it in."""
        with contextlib.ExitStack() as stack:
            if staged is not None:
                assert entries is not None
                scratch, downloaded = staged, _tree_size(staged)
            else:
                scratch = stack.enter_context(self.cache.temp_dir())
                if entries is None:  # the entry vanished since we looked, or no manifest
                    entries = self.manifest()
                if entries is None:
                    entries = _download_listed(self.origin, scratch, self.workers)
                    downloaded = _tree_size(scratch)
                    _expect(self.origin.uri, digest(entries), wanted)
                else:
                    _expect(self.origin.uri, digest(entries), wanted)
                    downloaded = _download(self.origin, entries, scratch, sorted(entries),
                                           self.workers)
            _write_atomically(scratch / MANIFEST, canonical(entries))
            os.chmod(scratch, 0o755)  # mkdtemp's 0o700 would hide it from other users' pods
            os.rename(scratch, self.cache.entry(wanted))
        return downloaded


def _log_fetch(uri: str, fetched: Fetched) -> None:
    moved = fetched.downloaded or fetched.bytes
    rate = moved / 1e6 / max(fetched.seconds, 1e-6)
    hit = "hit" if fetched.source == "cache-hit" else "miss"
    if fetched.source == "in-place":
        hit = "not cached"
    kind = "model file" if fetched.path.is_file() else "model directory"
    log.info("%s %s: %s (cache %s), digest %s, %d bytes (%d downloaded) "
             "in %.2fs, %.1f MB/s, at %s", kind, uri, fetched.source, hit, fetched.digest,
             fetched.bytes, fetched.downloaded, fetched.seconds, rate, fetched.path)


# --- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modelyard.runtime.modeldir DIR``: write DIR/SHA256SUMS, print the digest."""
    parser = argparse.ArgumentParser(
        prog="modelyard digest",
        description=f"Write DIR/{MANIFEST} (the sha256 of every file) and print the "
                    f"model directory's digest, the sha256 to give the model.")
    parser.add_argument("directory", type=Path, help="the model directory")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"error: not a directory: {args.directory}", file=sys.stderr)
        return 2
    try:
        print(write_manifest(args.directory))
    except (StorageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
