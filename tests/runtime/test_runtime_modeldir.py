"""Model directories: the digest, in-place file://, a real HTTP origin, S3 via moto, the
node cache (hits, repairs, LRU eviction, two processes at once)."""

from __future__ import annotations

import hashlib
import http.server
import logging
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import moto_s3

from modelyard.runtime.errors import ChecksumMismatch, StorageError
from modelyard.runtime.modeldir import (
    MANIFEST,
    Fetched,
    NodeCache,
    canonical,
    digest,
    fetch_dir,
    fetch_file,
    manifest_of,
    parse_manifest,
    write_manifest,
)
from modelyard.runtime.storage import FetchOptions

FAST = FetchOptions(attempts=2, backoff_s=0.01, timeout_s=10)
SHA_A = "a" * 64
SHA_B = "b" * 64


def make_model(directory: Path, seed: str, *, manifest: bool = True) -> str | None:
    """A small Hugging Face-style directory (a nested file too); its digest if it has a
    manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(f'{{"model_type": "tiny", "seed": "{seed}"}}\n')
    (directory / "tokenizer.json").write_text(f'{{"vocab": ["{seed}", "b"]}}\n')
    for shard in (1, 2):
        data = hashlib.sha256(f"{seed}{shard}".encode()).digest() * 1024  # 32 KiB
        (directory / f"model-0000{shard}-of-00002.safetensors").write_bytes(data)
    (directory / "extra").mkdir(exist_ok=True)
    (directory / "extra" / "generation_config.json").write_text('{"top_p": 0.9}\n')
    return write_manifest(directory) if manifest else None


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def leftovers(root: Path) -> list[str]:
    """Whatever a cache holds besides its lock files."""
    if not root.exists():
        return []
    return sorted(path.name for path in root.iterdir() if path.name != ".locks")


# --- the manifest and the digest ---------------------------------------------------------


def test_digest_is_the_sha256sum_pipeline(tmp_path: Path) -> None:
    model = tmp_path / "model"
    ours = make_model(model, "pipeline")
    pipeline = ("find . -type f ! -name SHA256SUMS | sed 's|^\\./||' | LC_ALL=C sort "
                "| xargs sha256sum | sha256sum")
    shell = subprocess.run(["bash", "-c", pipeline], cwd=model, capture_output=True,
                           text=True, check=True)
    assert shell.stdout.split()[0] == ours
    # The manifest written is canonical: its own sha256 is the digest, and sha256sum checks it.
    assert hashlib.sha256((model / MANIFEST).read_bytes()).hexdigest() == ours
    subprocess.run(["sha256sum", "--check", "--quiet", MANIFEST], cwd=model, check=True)
    assert digest(manifest_of(model)) == ours


def test_parse_accepts_what_sha256sum_writes(tmp_path: Path) -> None:
    text = (f"{SHA_B.upper()} *b/weights.bin\r\n"  # binary mode, CRLF, upper case
            f"\n{SHA_A}  a.json\n")
    entries = parse_manifest(text)
    assert entries == {"a.json": SHA_A, "b/weights.bin": SHA_B}
    assert canonical(entries) == f"{SHA_A}  a.json\n{SHA_B}  b/weights.bin\n"
    assert digest(entries) == hashlib.sha256(canonical(entries).encode()).hexdigest()
    assert digest(entries) == digest(parse_manifest(canonical(entries)))


@pytest.mark.parametrize(("text", "problem"), [
    (f"{SHA_A} config.json\n", "line 1: not '<64 hex digits>  <path>'"),
    (f"{SHA_A[:-1]}  config.json\n", "line 1: not '<64 hex"),
    (f"{SHA_A}  a\n{SHA_B}  ../etc/passwd\n", "line 2: the path is not normalised"),
    (f"{SHA_A}  /etc/passwd\n", "line 1: the path is absolute"),
    (f"{SHA_A}  a//b\n", "line 1: the path is not normalised"),
    (f"{SHA_A}  ./a\n", "line 1: the path is not normalised"),
    (f"{SHA_A}  a\n{SHA_B}  a\n", "line 2: the path is listed twice"),
    (f"{SHA_A}  SHA256SUMS\n", "line 1: SHA256SUMS does not list itself"),
    (f"\\{SHA_A}  a\\\\b\n", "line 1: not '<64 hex"),
    (f"{SHA_A}  a\n{SHA_B}  a/b\n", "'a' is listed as a file and as the directory of 'a/b'"),
    ("\n\n", "it lists no files"),
])
def test_bad_manifests_are_refused_naming_the_line(text: str, problem: str) -> None:
    with pytest.raises(StorageError, match="bad manifest") as caught:
        parse_manifest(text, "s3://models/x/SHA256SUMS")
    assert problem in str(caught.value)
    assert "s3://models/x/SHA256SUMS" in str(caught.value)


def test_a_listing_leaves_out_hidden_files_and_the_manifest(tmp_path: Path) -> None:
    model = tmp_path / "model"
    make_model(model, "hidden")
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "lock").write_text("x")
    (model / "extra" / ".DS_Store").write_text("x")
    assert sorted(manifest_of(model)) == [
        "config.json", "extra/generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "tokenizer.json"]


def test_the_digest_command(tmp_path: Path) -> None:
    model = tmp_path / "model"
    make_model(model, "cli", manifest=False)
    done = subprocess.run([sys.executable, "-m", "modelyard.runtime.modeldir", str(model)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == digest(parse_manifest((model / MANIFEST).read_text()))
    missing = subprocess.run([sys.executable, "-m", "modelyard.runtime.modeldir",
                              str(tmp_path / "nope")], check=False, capture_output=True,
                             text=True)
    assert missing.returncode == 2
    assert "not a directory" in missing.stderr


def test_importing_it_needs_only_urllib3_and_the_stdlib() -> None:
    code = ("import sys, modelyard.runtime.modeldir; "
            "print(sorted({'torch', 'numpy', 'pydantic', 'boto3', 'fastapi'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


# --- file:// in place --------------------------------------------------------------------


def test_a_local_directory_is_verified_and_served_in_place(tmp_path: Path) -> None:
    model = tmp_path / "model"
    expected = make_model(model, "local")
    assert expected is not None
    fetched = fetch_dir(f"file://{model}", tmp_path / "cache", expected.upper())
    assert (fetched.path, fetched.digest, fetched.source) == (model, expected, "in-place")
    assert fetched.bytes == sum(len(data) for name, data in files_of(model).items()
                                if name != MANIFEST)
    assert fetched.in_use is None
    assert not (tmp_path / "cache").exists()  # nothing copied
    # A plain path (a PVC mount) is the same; without a manifest it is hashed.
    (model / MANIFEST).unlink()
    assert fetch_dir(str(model), tmp_path / "cache", expected).digest == expected


def test_a_local_directory_that_differs_is_refused_naming_the_file(tmp_path: Path) -> None:
    model = tmp_path / "model"
    expected = make_model(model, "local")
    uri = f"file://{model}"
    with pytest.raises(ChecksumMismatch, match=f"manifest digest is {expected}, but {SHA_A}"):
        fetch_dir(uri, tmp_path / "cache", SHA_A)
    (model / "model-00002-of-00002.safetensors").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch, match=r"model-00002-of-00002\.safetensors has sha256"):
        fetch_dir(uri, tmp_path / "cache", expected)
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ChecksumMismatch, match=r"model-00002-of-00002\.safetensors is missing"):
        fetch_dir(uri, tmp_path / "cache")
    make_model(model, "local")
    (model / "model-00003-of-00002.safetensors").write_bytes(b"an extra shard")
    with pytest.raises(ChecksumMismatch, match=r"00003-of-00002\.safetensors is not listed"):
        fetch_dir(uri, tmp_path / "cache")
    with pytest.raises(StorageError, match="model directory not found"):
        fetch_dir(f"file://{tmp_path}/nope/", tmp_path / "cache")


# --- a real HTTP origin ------------------------------------------------------------------


class Origin:
    """A real HTTP server over a directory, logging every GET; ``delay`` slows model files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.delay = 0.0
        self.log: list[tuple[float, str]] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
                origin.log.append((time.monotonic(), path))
                file = origin.root / path
                if not file.is_file() or not file.resolve().is_relative_to(origin.root):
                    self.send_error(404)
                    return
                if origin.delay and not path.endswith(MANIFEST):
                    time.sleep(origin.delay)
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def gets(self, since: int = 0) -> list[str]:
        return sorted(path for _, path in self.log[since:])

    def model_gets(self, since: int = 0) -> list[str]:
        return [path for path in self.gets(since) if not path.endswith(MANIFEST)]


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    root = tmp_path / "origin"
    root.mkdir()
    served = Origin(root.resolve())
    yield served
    served.server.shutdown()
    served.server.server_close()


def test_http_download_then_hits_without_fetching_model_files(
        origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    expected = make_model(origin.root / "llm" / "tiny", "http")
    cache = NodeCache(tmp_path / "cache")
    uri = f"{origin.url}/llm/tiny/"
    caplog.set_level(logging.INFO, logger="modelyard.runtime.modeldir")
    first = fetch_dir(uri, cache, None, options=FAST)
    assert (first.source, first.digest, first.path) == ("download", expected,
                                                         cache.entry(str(expected)))
    assert files_of(first.path) == files_of(origin.root / "llm" / "tiny")  # SHA256SUMS too
    assert first.downloaded == first.bytes > 0
    assert len(origin.model_gets()) == 5  # every file once, the nested one included
    assert "download (cache miss)" in caplog.text
    assert "MB/s" in caplog.text

    seen = len(origin.log)
    again = fetch_dir(uri.rstrip("/"), cache, expected, options=FAST)
    assert (again.source, again.path, again.downloaded) == ("cache-hit", first.path, 0)
    assert origin.gets(seen) == []  # the digest was known: not even the manifest
    caplog.clear()
    third = fetch_dir(uri, cache, None, options=FAST)
    assert third.source == "cache-hit"
    assert origin.gets(seen) == ["llm/tiny/SHA256SUMS"]  # only to learn the digest
    assert "cache-hit (cache hit)" in caplog.text
    assert leftovers(cache.root) == [expected]
    for fetched in (first, again, third):
        fetched.release()


def test_a_wrong_digest_is_refused_and_nothing_cached(origin: Origin, tmp_path: Path) -> None:
    expected = make_model(origin.root / "m", "wrong")
    with pytest.raises(ChecksumMismatch) as caught:
        fetch_dir(f"{origin.url}/m/", tmp_path / "cache", SHA_A, options=FAST)
    assert str(caught.value) == (f"refusing to serve {origin.url}/m/: its manifest digest is "
                                 f"{expected}, but {SHA_A} was expected")
    assert origin.model_gets() == []
    assert leftovers(tmp_path / "cache") == []
    with pytest.raises(StorageError, match="is not 64 hex digits"):
        fetch_dir(f"{origin.url}/m/", tmp_path / "cache", "../../etc", options=FAST)


def test_a_file_tampered_at_the_origin_is_refused_naming_it(origin: Origin,
                                                           tmp_path: Path) -> None:
    expected = make_model(origin.root / "m", "tampered")
    (origin.root / "m" / "extra" / "generation_config.json").write_text('{"top_p": 1}\n')
    with pytest.raises(ChecksumMismatch,
                       match=r"its file extra/generation_config\.json has sha256 .* but its "
                             r"SHA256SUMS says"):
        fetch_dir(f"{origin.url}/m/", tmp_path / "cache", expected, options=FAST)
    assert leftovers(tmp_path / "cache") == []  # the temporary copy is gone


def test_a_damaged_cache_entry_is_repaired_file_by_file(origin: Origin, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    expected = make_model(origin.root / "m", "repair")
    assert expected is not None
    uri, cache = f"{origin.url}/m/", NodeCache(tmp_path / "cache")
    fetch_dir(uri, cache, expected, options=FAST).release()
    good = files_of(cache.entry(expected))
    shard = cache.entry(expected) / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    (cache.entry(expected) / "extra" / "generation_config.json").unlink()

    seen = len(origin.log)
    with fetch_dir(uri, cache, expected, options=FAST) as fetched:
        assert fetched.source == "repaired"
        assert fetched.downloaded == len(good["model-00001-of-00002.safetensors"]) + len(
            good["extra/generation_config.json"])
    assert origin.gets(seen) == ["m/extra/generation_config.json",
                                 "m/model-00001-of-00002.safetensors"]
    assert files_of(cache.entry(expected)) == good
    assert "model-00001-of-00002.safetensors has sha256" in caplog.text  # the warning

    # Damaged here and changed at the origin: refused, never served damaged.
    shard.write_bytes(b"bit rot")
    (origin.root / "m" / "model-00001-of-00002.safetensors").write_bytes(b"something else")
    with pytest.raises(ChecksumMismatch, match=r"model-00001-of-00002\.safetensors"):
        fetch_dir(uri, cache, expected, options=FAST)
    assert not [name for name in leftovers(cache.root) if name.startswith(".tmp-")]


def test_a_cache_entry_with_a_damaged_manifest_is_fetched_again(origin: Origin,
                                                                tmp_path: Path) -> None:
    expected = make_model(origin.root / "m", "manifest")
    assert expected is not None
    cache = NodeCache(tmp_path / "cache")
    fetch_dir(f"{origin.url}/m/", cache, expected, options=FAST).release()
    (cache.entry(expected) / MANIFEST).write_text("garbage\n")
    with fetch_dir(f"{origin.url}/m/", cache, expected, options=FAST) as fetched:
        assert fetched.source == "download"
    assert files_of(cache.entry(expected)) == files_of(origin.root / "m")


def test_http_without_a_manifest_says_how_to_make_one(origin: Origin, tmp_path: Path) -> None:
    make_model(origin.root / "m", "bare", manifest=False)
    with pytest.raises(StorageError, match=r"has no SHA256SUMS.*`modelyard digest DIR`"):
        fetch_dir(f"{origin.url}/m/", tmp_path / "cache", options=FAST)
    with pytest.raises(StorageError, match="unsupported URI scheme 'ftp'"):
        fetch_dir("ftp://host/m/", tmp_path / "cache", options=FAST)


def test_least_recently_used_entries_are_evicted_but_not_one_in_use(
        origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    digests = {name: make_model(origin.root / name, name) for name in ("a", "b", "c")}
    entry_size = sum(len(data) for data in files_of(origin.root / "a").values())
    cache = NodeCache(tmp_path / "cache", max_bytes=int(entry_size * 2.5))

    def fetch(name: str) -> Fetched:
        return fetch_dir(f"{origin.url}/{name}/", cache, digests[name], options=FAST)

    held = fetch("a")  # a server keeps using it
    with fetch("b"):
        pass
    with fetch("c"):
        pass  # three entries, over the bound: "a" is the oldest but in use, so "b" goes
    assert [path.name for path in cache.entries()] == [digests["a"], digests["c"]]
    assert f"evicted {digests['b']}" in caplog.text

    held.release()
    with fetch("b"):  # downloaded again; now "a" is the least recently used and idle
        pass
    assert [path.name for path in cache.entries()] == [digests["c"], digests["b"]]
    assert sorted(p.name for p in (cache.root / ".locks").iterdir()) == sorted(
        ["cache.lock"] + [f"{digests[n]}.{kind}" for n in "bc" for kind in ("inuse", "lock")])


def test_a_cache_of_one_keeps_the_entry_just_fetched(origin: Origin, tmp_path: Path) -> None:
    expected = make_model(origin.root / "m", "small")
    cache = NodeCache(tmp_path / "cache", max_bytes=1)
    (cache.root / ".tmp-left-by-a-dead-process").mkdir(parents=True)
    with fetch_dir(f"{origin.url}/m/", cache, expected, options=FAST) as fetched:
        assert fetched.path.is_dir()
    assert leftovers(cache.root) == [expected]  # the dead process's temporary dir is gone


_FETCH_SCRIPT = """
import sys, time
from pathlib import Path
from modelyard.runtime.modeldir import fetch_dir
uri, root, start_at = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
fetched = fetch_dir(uri, root)
print(fetched.source, fetched.digest)
"""


def _two_at_once(script: str, uri: str, cache: Path) -> list[str]:
    """``script`` (uri, cache root, start time) in two processes that start fetching at the
    same moment, both past their imports; their outputs."""
    start_at = str(time.time() + 1.5)
    processes = [subprocess.Popen([sys.executable, "-c", script, uri, str(cache), start_at],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        outputs.append(out)
    return outputs


def test_two_processes_fetching_one_model_download_it_once(origin: Origin,
                                                           tmp_path: Path) -> None:
    expected = make_model(origin.root / "m", "shared")
    origin.delay = 0.4  # each model file takes this long: the second process must wait
    results = [out.split() for out in _two_at_once(_FETCH_SCRIPT, f"{origin.url}/m/",
                                                   tmp_path / "cache")]
    assert sorted(results) == [["cache-hit", expected], ["download", expected]]
    assert sorted(origin.model_gets()) == sorted(set(origin.model_gets()))  # each file once
    assert len(origin.model_gets()) == 5
    asked = sorted(at for at, path in origin.log if path.endswith(MANIFEST))
    first_file = min(at for at, path in origin.log if not path.endswith(MANIFEST))
    assert asked[1] < first_file + origin.delay  # they overlapped: the second one waited


# --- a single-file model (the tensor runtime's) in the same cache -------------------------


def test_a_model_file_is_fetched_once_and_verified_on_every_use(
        origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = b"torchscript bytes" * 1000
    (origin.root / "m.pt").write_bytes(data)
    good = hashlib.sha256(data).hexdigest()
    uri, cache = f"{origin.url}/m.pt", NodeCache(tmp_path / "cache")
    with pytest.raises(ChecksumMismatch):
        fetch_file(uri, cache, "0" * 64, options=FAST)
    assert cache.entries() == []  # nothing unverified is kept
    first = fetch_file(uri, cache, good, options=FAST)
    assert (first.source, first.downloaded, first.path.read_bytes()) == ("download",
                                                                         len(data), data)
    second = fetch_file(uri, cache, good, options=FAST)
    assert (second.source, second.path, second.downloaded) == ("cache-hit", first.path, 0)
    assert origin.model_gets() == ["m.pt", "m.pt"]  # the refused one, then one download

    first.path.write_bytes(b"damaged on the node")  # a bad disk, a stray writer
    caplog.set_level(logging.WARNING, logger="modelyard.runtime.modeldir")
    third = fetch_file(uri, cache, good, options=FAST)
    assert (third.source, third.path.read_bytes()) == ("download", data)  # never served
    assert "is damaged" in caplog.text
    for fetched in (first, second, third):
        fetched.release()


_FETCH_FILE_SCRIPT = """
import sys, time
from pathlib import Path
from modelyard.runtime.modeldir import NodeCache, fetch_file
uri, root, start_at = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
print(fetch_file(uri, NodeCache(root)).source)
"""


def test_two_pods_starting_together_download_a_model_file_once(origin: Origin,
                                                               tmp_path: Path) -> None:
    (origin.root / "m.pt").write_bytes(b"x" * 4096)
    origin.delay = 0.4  # the second process must wait on the first's lock
    sources = [out.strip() for out in _two_at_once(_FETCH_FILE_SCRIPT, f"{origin.url}/m.pt",
                                                   tmp_path / "cache")]
    assert sorted(sources) == ["cache-hit", "download"]
    assert origin.model_gets() == ["m.pt"]


def test_model_files_and_directories_are_evicted_together_least_recently_used(
        origin: Origin, tmp_path: Path) -> None:
    directory = make_model(origin.root / "llm", "dir")
    size = sum(len(data) for data in files_of(origin.root / "llm").values())
    for name in ("a.pt", "b.pt"):
        (origin.root / name).write_bytes(name.encode() * (size // 4))
    cache = NodeCache(tmp_path / "cache", max_bytes=int(size * 1.6))
    with fetch_dir(f"{origin.url}/llm/", cache, directory, options=FAST):
        pass
    held = fetch_file(f"{origin.url}/a.pt", cache, options=FAST)  # a server runs on it
    with fetch_file(f"{origin.url}/b.pt", cache, options=FAST):
        pass  # over the bound: the directory is the oldest and idle, so it goes
    kept = [path.name for path in cache.entries()]
    assert directory not in kept
    assert held.path.parent.name in kept
    held.release()
    assert leftovers(cache.root) == sorted(kept)


# --- S3 (moto's S3-compatible server) ----------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3-compatible server on loopback."""
    with moto_s3("127.0.0.1", tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def s3_model(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """s3://llm/tiny/: a model with no SHA256SUMS, a hidden file and a folder marker; the
    local directory it was uploaded from."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    client = boto3.client("s3")
    if "llm" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket="llm")
    local = tmp_path / "upload"
    make_model(local, "s3", manifest=False)
    for name, data in files_of(local).items():
        client.put_object(Bucket="llm", Key=f"tiny/{name}", Body=data)
    client.put_object(Bucket="llm", Key="tiny/.gitattributes", Body=b"*.safetensors lfs\n")
    client.put_object(Bucket="llm", Key="tiny/empty/", Body=b"")
    client.put_object(Bucket="llm", Key="tinier/config.json", Body=b"{}")  # a sibling prefix
    return local


def test_s3_without_a_manifest_is_listed(s3_model: Path, tmp_path: Path) -> None:
    expected = digest(manifest_of(s3_model))
    cache = NodeCache(tmp_path / "cache")
    with fetch_dir("s3://llm/tiny", cache, None, options=FAST) as fetched:
        assert (fetched.source, fetched.digest) == ("download", expected)
        assert files_of(fetched.path) == {**files_of(s3_model),
                                          MANIFEST: canonical(manifest_of(s3_model)).encode()}
    with fetch_dir("s3://llm/tiny/", cache, expected, options=FAST) as again:
        assert again.source == "cache-hit"
    with fetch_dir("s3://llm/tiny/", tmp_path / "known", expected, options=FAST) as known:
        assert (known.source, known.digest) == ("download", expected)  # listed, under the lock
    with pytest.raises(ChecksumMismatch, match=f"manifest digest is {expected}, but {SHA_B}"):
        fetch_dir("s3://llm/tiny/", tmp_path / "other", SHA_B, options=FAST)
    assert leftovers(tmp_path / "other") == []
    with pytest.raises(StorageError, match="no files to serve under s3://llm/nothing/"):
        fetch_dir("s3://llm/nothing/", tmp_path / "other", options=FAST)
