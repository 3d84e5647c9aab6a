"""Build and cache the container images a real node runs, with no registry at all.

* **base**: a stand-in for ``python:3.11-slim-bookworm`` (no registry is reachable here),
  made from Debian bookworm with mmdebstrap: Debian's Python 3.11 and pip.
* **pause**: the sandbox program of :mod:`.nodebinaries` in a ``scratch`` image.
* **operator** and **runtime**: ``Dockerfile.operator`` and ``Dockerfile.runtime``,
  built *unmodified* with buildah; the stand-in base goes in through their build
  arguments. The runtime's torch comes from PyPI (torch's own CPU index is not reachable
  here), which is the CUDA build; its wheels (2.8 GB) are downloaded once into a local
  index, ``file://`` mounted into the build as ``TORCH_INDEX``, because the Dockerfile's
  ``uv pip install --no-cache`` would not use a mounted uv cache.

Each image is saved as a ``docker-archive`` tarball under ``~/.cache/modelyard/<key>/``
(what ``ctr images import`` reads); the key is a hash of everything that goes into it:
the Dockerfile, the files of its build context (``.dockerignore`` applied), its build
arguments and the keys of the images and wheels it is built from. An unchanged key
reuses the archive. Builds run in a buildah storage of our own under the same cache, with
buildah's layer cache on: a changed source rebuilds only the layers after its ``COPY``, so
the runtime's torch layer (which comes before it) is built once.
``modelyard build-node`` builds them all; :func:`ensure_images` is the entry point.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .binaries import BuildError, cache_root, cached_tree, run_tool
from .nodebinaries import NodeBinaries, ensure_node_binaries

BASE_IMAGE = "localhost/modelyard/python:3.11-slim-bookworm"
PAUSE_IMAGE = "localhost/modelyard/pause:3.10"
UV_IMAGE = "localhost/modelyard/uv"  # a stand-in for ghcr.io/astral-sh/uv, tagged alike
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("ca-certificates", "netbase", "tzdata", "python3", "python3-pip",
                 "python-is-python3")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_WHEELHOUSE_MOUNT = "/modelyard-wheelhouse"


@dataclass(frozen=True)
class Image:
    """A built image: its name (as pods refer to it) and its docker-archive tarball."""

    name: str
    archive: Path

    @property
    def key(self) -> str:
        return self.archive.parent.name


@dataclass(frozen=True)
class Images:
    base: Image
    pause: Image
    operator: Image
    runtime: Image

    def all(self) -> tuple[Image, ...]:
        return (self.pause, self.operator, self.runtime)


def ensure_images(context: Path | None = None, node: NodeBinaries | None = None) -> Images:
    """Every image of a real node, built first where missing or out of date."""
    context = context or repo_root()
    base = _ensure_base_image()
    uv = _ensure_uv_image(_arg_default(context / "Dockerfile.runtime", "UV_IMAGE"))
    pause = _ensure_pause_image(node or ensure_node_binaries())
    operator = _ensure_project_image(context, "operator", base, _args(base, uv, "operator"))
    runtime = _ensure_project_image(context, "runtime", base, _args(base, uv, "runtime"))
    return Images(base, pause, operator, runtime)


def _args(base: Image, uv: Image, flavour: str) -> dict[str, str]:
    """The build arguments that put the stand-ins in place of the Dockerfiles' defaults."""
    args = {"PYTHON_IMAGE": base.name, "UV_IMAGE": uv.name}
    return {**args, "BASE_IMAGE": base.name} if flavour == "runtime" else args


def find_images(context: Path | None = None) -> Images | None:
    """The images for this source tree if they are built, else None (builds nothing)."""
    context = context or repo_root()
    root = cache_root()
    base = _image(root / _base_key(), BASE_IMAGE)
    uv = _uv_image(_arg_default(context / "Dockerfile.runtime", "UV_IMAGE"))
    operator = _project_image(context, "operator", base, _args(base, uv, "operator"))
    runtime = _project_image(context, "runtime", base, _args(base, uv, "runtime"))
    pauses = sorted(root.glob("image-pause-*/image.tar"))
    found = Images(base, Image(PAUSE_IMAGE, pauses[-1]) if pauses else base, operator, runtime)
    if not pauses or not all(i.archive.is_file() for i in (base, uv, operator, runtime)):
        return None
    return found


def repo_root() -> Path:
    here = Path(__file__).resolve().parents[2]
    if not (here / "Dockerfile.runtime").is_file():
        raise BuildError(f"no Dockerfile.runtime in {here}: pass the source tree to build")
    return here


# -- the images ----------------------------------------------------------------------


def _ensure_base_image() -> Image:
    key = _base_key()
    tree = cached_tree(f"the stand-in {BASE_IMAGE} (Debian {DEBIAN_SUITE}, mmdebstrap)", key,
                       _has_archive, _build_base)
    image = _image(tree, BASE_IMAGE)
    _load_into_buildah(image)
    return image


def _uv_image(reference: str) -> Image:
    """The stand-in for ``reference`` (``ghcr.io/astral-sh/uv:X.Y.Z``): the same tag."""
    version = reference.rpartition(":")[2]
    return Image(f"{UV_IMAGE}:{version}", cache_root() / f"image-uv-{version}" / "image.tar")


def _ensure_uv_image(reference: str) -> Image:
    """uv's image rebuilt from its PyPI wheel: ``/uv`` and ``/uvx`` in ``scratch``, as
    ``ghcr.io/astral-sh/uv`` has them (no registry is reachable here)."""
    image = _uv_image(reference)
    version = image.name.rpartition(":")[2]

    def build(out: Path, work: Path) -> None:
        run_tool([sys.executable, "-m", "pip", "download", "--no-cache-dir", "--no-deps",
                  "--only-binary=:all:", "--progress-bar=off", "--platform=manylinux_2_17_x86_64",
                  "-d", str(work), f"uv=={version}"], cwd=work, env=dict(os.environ))
        [wheel] = work.glob("uv-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name in ("uv", "uvx"):
                target = work / name
                target.write_bytes(archive.read(f"uv-{version}.data/scripts/{name}"))
                target.chmod(0o755)
        container = _buildah("from", "scratch").strip()
        try:
            for name in ("uv", "uvx"):
                _buildah("copy", container, str(work / name), f"/{name}")
            _buildah("config", "--entrypoint", '["/uv"]', container)
            _buildah("commit", "--quiet", container, image.name)
        finally:
            _buildah("rm", container)
        _save(image.name, out)

    tree = cached_tree(f"the stand-in {reference} (uv {version} from PyPI)",
                       image.archive.parent.name, _has_archive, build)
    built = _image(tree, image.name)
    _load_into_buildah(built)
    return built


def _ensure_pause_image(node: NodeBinaries) -> Image:
    key = f"image-pause-{_digest(node.root.name)}"

    def build(out: Path, work: Path) -> None:
        shutil.copy2(node.path("pause"), work / "pause")
        container = _buildah("from", "scratch").strip()
        try:
            _buildah("copy", container, str(work / "pause"), "/pause")
            _buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535",
                     container)
            _buildah("commit", "--quiet", container, PAUSE_IMAGE)
        finally:
            _buildah("rm", container)
        _save(PAUSE_IMAGE, out)

    return _image(cached_tree(f"the pause image {PAUSE_IMAGE}", key, _has_archive, build),
                  PAUSE_IMAGE)


def _ensure_project_image(context: Path, flavour: str, base: Image,
                         args: dict[str, str]) -> Image:
    """``Dockerfile.<flavour>`` built unmodified from ``context``."""
    image = _project_image(context, flavour, base, args)
    dockerfile = context / f"Dockerfile.{flavour}"
    volumes = [f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    if flavour == "runtime":
        wheels = _ensure_torch_wheelhouse(_arg_default(dockerfile, "TORCH_VERSION"))
        volumes.append(f"{wheels}:{_WHEELHOUSE_MOUNT}:ro")
        args = {**args, "TORCH_INDEX": f"file://{_WHEELHOUSE_MOUNT}/simple"}

    def build(out: Path, work: Path) -> None:
        _load_into_buildah(base)
        argv = ["bud", "--pull=never", "--network=host", "--layers=true",
                "--ulimit=nofile=20000:20000", "--ulimit=nproc=32768:32768",
                "-f", str(dockerfile),
                "-t", image.name]
        argv += [f"--build-arg={k}={v}" for k, v in sorted(args.items())]
        argv += [f"--volume={v}" for v in volumes]
        before = set(_containers())
        try:
            _buildah(*argv, str(context), stream=True)
        finally:
            # buildah 1.28 leaves the working container of every RUN --mount=from=IMAGE
            # behind, mounted (41 of uv's here after a day of builds): drop those this build
            # made.
            leaked = set(_containers()) - before
            if leaked:
                _buildah("rm", *sorted(leaked), check=False)
        _save(image.name, out)
        # The new image stays tagged: removing it would also remove its untagged parents,
        # the cached layers (torch's among them) the next build reuses. Older builds of the
        # same image go, and with them only the layers no other image uses.
        # (buildah 1.28 knows no image by its bare repository name: list them all.)
        repository = image.name.rpartition(":")[0]
        listed = _buildah("images", "--format", "{{.Name}}:{{.Tag}}", check=False).split()
        for old in {n for n in listed if n.rpartition(":")[0] == repository} - {image.name}:
            _buildah("rmi", old, check=False)

    tree = cached_tree(f"the {flavour} image {image.name} (buildah, {dockerfile.name})",
                       image.key, _has_archive, build)
    _prune(f"image-{flavour}-", keep=tree)
    return _image(tree, image.name)


def _prune(prefix: str, keep: Path, spare: int = 1) -> None:
    """Delete older builds of one image (6 GB each for the runtime): all but ``keep`` and the
    ``spare`` newest others (another checkout's tree may still use its own)."""
    others = sorted((p for p in cache_root().glob(f"{prefix}*")
                     if p.is_dir() and p != keep), key=lambda p: p.stat().st_mtime)
    for old in others[:-spare] if spare else others:
        shutil.rmtree(old, ignore_errors=True)


def _ensure_torch_wheelhouse(version: str) -> Path:
    """PyPI's torch ``version`` and its dependencies for CPython 3.11 on x86-64 Linux, with
    a PEP 503 index in ``simple/``; this machine's Python must be 3.11 to fetch them."""
    if sys.version_info[:2] != (3, 11):
        raise BuildError("the runtime image's torch wheels are fetched with this Python's "
                         "pip, which must be CPython 3.11 (the image's)")

    def build(out: Path, work: Path) -> None:
        run_tool([sys.executable, "-m", "pip", "download", "--no-cache-dir",
                  "--only-binary=:all:", "--progress-bar=off", "-d", str(out),
                  f"torch=={version}"], cwd=work, env=dict(os.environ))
        for wheel in sorted(out.glob("*.whl")):
            project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
            index = out / "simple" / project / "index.html"
            index.parent.mkdir(parents=True, exist_ok=True)
            with index.open("a") as handle:
                handle.write(f'<a href="../../{wheel.name}">{wheel.name}</a>\n')

    return cached_tree(f"torch {version} wheels from PyPI", f"wheelhouse-torch-{version}-cp311",
                       lambda p: (p / "simple" / "torch" / "index.html").is_file(), build,
                       verb="downloading")


# -- keys ----------------------------------------------------------------------------


def context_files(context: Path) -> list[Path]:
    """The files of the build context, ``.dockerignore`` applied as Docker does: a pattern
    matches a path or any folder above it, ``**/`` any depth, ``!`` re-includes, and the
    last matching line wins."""
    rules: list[tuple[bool, str]] = []
    ignore = context / ".dockerignore"
    if ignore.is_file():
        for raw in ignore.read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                rules.append((line.startswith("!"), line.lstrip("!").strip("/")))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for negated, pattern in rules:
            bare = pattern.removeprefix("**/")
            if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, bare) for p in prefixes):
                verdict = not negated
        return verdict

    reincluded = [p for negated, p in rules if negated]
    found = []
    for folder, dirs, files in os.walk(context):
        here = Path(folder)
        for name in list(dirs):
            rel = (here / name).relative_to(context).as_posix()
            if excluded(rel) and not any(p.startswith(rel + "/") for p in reincluded):
                dirs.remove(name)
        for name in files:
            rel = (here / name).relative_to(context).as_posix()
            if not excluded(rel):
                found.append(here / name)
    return sorted(found)


def _project_image(context: Path, flavour: str, base: Image, args: dict[str, str]) -> Image:
    dockerfile = context / f"Dockerfile.{flavour}"
    digest = hashlib.sha256()
    digest.update(dockerfile.read_bytes())
    digest.update(repr(sorted(args.items())).encode())
    digest.update(base.key.encode())
    if flavour == "runtime":
        digest.update(_arg_default(dockerfile, "TORCH_VERSION").encode())
    for path in context_files(context):
        digest.update(path.relative_to(context).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    key = digest.hexdigest()[:16]
    version = _arg_default(dockerfile, "VERSION")
    name = f"localhost/modelyard-{flavour}:{version}-{key[:12]}"
    return Image(name, cache_root() / f"image-{flavour}-{key}" / "image.tar")


def _base_key() -> str:
    recipe = f"{DEBIAN_SUITE} {DEBIAN_MIRROR} {BASE_PACKAGES} {_BASE_HOOKS} {_BASE_ENV}"
    return f"image-base-python3.11-{DEBIAN_SUITE}-{_digest(recipe)}"


def _arg_default(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", dockerfile.read_text(), re.MULTILINE)
    if match is None:
        raise BuildError(f"{dockerfile.name} has no default for ARG {name}")
    return match.group(1)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _image(tree: Path, name: str) -> Image:
    return Image(name, tree / "image.tar")


def _has_archive(tree: Path) -> bool:
    return (tree / "image.tar").is_file()


# -- buildah and mmdebstrap ----------------------------------------------------------

# Like the official image: pip may install into the system Python (no PEP 668 marker),
# no apt lists or caches, no docs.
# SSL_CERT_FILE: uv reads its CAs from its own bundle unless told, and the build mounts
# this machine's bundle (which may hold a proxy's CA) at Debian's path. (buildah 1.28's
# `bud --env` reaches the image's config, not its RUN steps.)
_BASE_ENV = ("LANG=C.UTF-8", "PYTHON_VERSION=3.11", f"SSL_CERT_FILE={HOST_CA_BUNDLE}")
_BASE_HOOKS = (
    'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
)


def _build_base(out: Path, work: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise BuildError("building the stand-in base image needs mmdebstrap: "
                         "apt-get install mmdebstrap (scripts/system-packages.txt)")
    rootfs = work / "rootfs.tar"
    suites = [f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main",
              f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main",
              f"deb {DEBIAN_MIRROR}-security {DEBIAN_SUITE}-security main"]
    argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
            *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")),
            *(f"--customize-hook={hook}" for hook in _BASE_HOOKS),
            DEBIAN_SUITE, str(rootfs), *suites]
    run_tool(argv, cwd=work, env=dict(os.environ))
    _import_rootfs(rootfs, out)


def _import_rootfs(rootfs: Path, out: Path) -> None:
    container = _buildah("from", "scratch").strip()
    try:
        _buildah("add", container, str(rootfs), "/")
        _buildah("config", *(f"--env={e}" for e in _BASE_ENV), "--cmd", '["python3"]',
                 container)
        _buildah("commit", "--quiet", container, BASE_IMAGE)
    finally:
        _buildah("rm", container)
    _save(BASE_IMAGE, out)


def _save(name: str, out: Path) -> None:
    _buildah("push", "--quiet", name, f"docker-archive:{out / 'image.tar'}:{name}")


def _load_into_buildah(image: Image) -> None:
    if _buildah("images", "--quiet", image.name, check=False).strip():
        return
    _buildah("pull", "--quiet", f"docker-archive:{image.archive}")


def buildah_storage() -> list[str]:
    """Global flags that keep our builds in a storage of their own, under the cache."""
    return [f"--root={cache_root() / 'buildah' / 'storage'}",
            "--runroot=/run/modelyard/buildah", "--storage-driver=overlay"]


def _containers() -> list[str]:
    """The IDs of buildah's working containers in our storage."""
    return _buildah("containers", "--quiet", "--notruncate", check=False).split()


def _buildah(*args: str, check: bool = True, stream: bool = False) -> str:
    if shutil.which("buildah") is None:
        raise BuildError("building images needs buildah: apt-get install buildah "
                         "(scripts/system-packages.txt)")
    argv = ["buildah", *buildah_storage(), *args]
    if stream:  # long builds: show their progress as they go
        import subprocess

        code = subprocess.run(argv, check=False).returncode
        if code != 0 and check:
            raise BuildError(f"{' '.join(argv[:8])}... failed ({code}); its output is above")
        return ""
    if not check:
        import subprocess

        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return run_tool(argv, cwd=Path.cwd(), env=dict(os.environ))


__all__ = ["BASE_IMAGE", "PAUSE_IMAGE", "Image", "Images", "context_files", "ensure_images",
           "find_images", "repo_root"]
