"""Replay a Dockerfile's steps on this machine, which has no container engine.

Used by ``test_images.py``. ``Dockerfile`` reads a file with ``dockerfile-parse``
(stages, ARG/ENV substitution, quoting) and ``Replay`` carries out its steps inside
an *image root*: a directory standing for ``/``, so the image path ``/opt/venv``
is ``<root>/opt/venv`` here.

* The build stage: ``COPY`` takes files from the build context as Docker sends it
  (``.dockerignore`` applied by the Docker SDK's own matcher), ``WORKDIR`` moves,
  ``uv build --wheel`` builds the wheel. ``COPY --from`` uv's own image
  (``ghcr.io/astral-sh/uv``) is the one step not carried out: the replay brings its
  own uv, and ``RUN --mount`` of it is dropped likewise.
* The final stage: ``COPY --from=STAGE`` copies between roots; ``RUN`` commands
  split on ``&&`` are carried out when the replay knows them (``uv venv``,
  ``uv pip install``, ``mkdir -p``, ``chown``, ``groupadd``/``useradd`` recorded,
  the home created, ``apt-get install`` checked against this machine's Debian
  packages, on which the replayed image runs), and anything else fails loudly, so a
  new step in a Dockerfile is never silently skipped.
* ``Replay.launch`` starts ENTRYPOINT + CMD (or a pod's ``command`` and ``args``)
  with the image's ENV (its paths mapped into the root), from its WORKDIR, as its
  USER (``setpriv``, since tests run as root here).

Two knowingly different things, both about where bytes come from, not what gets
installed: ``uv pip install`` is given a constraints file pinning every package
to the version of the development venv (what the rest of the suite tested, and
what uv's cache holds, so the GBs of torch are not downloaded again), and uv's
cache is used (``--no-cache`` dropped). The interpreter is this machine's Debian
``python3.11`` (the base image's Python is Debian's 3.11 too).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import WordSplitter

# What Docker gives a container when the image sets no PATH of its own.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# uv's own image, which the Dockerfiles take uv from; the replay runs this machine's uv.
UV_IMAGE = "ghcr.io/astral-sh/uv"


class ReplayError(AssertionError):
    """A step the replay cannot carry out (so the test fails rather than skip it)."""


@dataclass(frozen=True)
class Step:
    """One instruction, with the ARG and ENV values in force where it stands."""

    instruction: str
    value: str
    line: int
    args: Mapping[str, str]
    envs: Mapping[str, str]

    def words(self) -> list[str]:
        """The value split like a shell would, variables substituted, quotes removed."""
        return list(WordSplitter(self.value, args=dict(self.args), envs=dict(self.envs)).split())

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD, or None for the shell form."""
        try:
            parsed = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        if isinstance(parsed, list) and all(isinstance(w, str) for w in parsed):
            return parsed
        return None


@dataclass
class Stage:
    base: str  # the resolved image reference of its FROM
    name: str | None
    steps: list[Step] = field(default_factory=list)

    def all(self, instruction: str) -> list[Step]:
        return [s for s in self.steps if s.instruction == instruction]

    def last(self, instruction: str) -> Step | None:
        found = self.all(instruction)
        return found[-1] if found else None


class Dockerfile:
    """A parsed Dockerfile, as ``docker build --build-arg K=V`` would see it."""

    def __init__(self, path: Path, build_args: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.parser = DockerfileParser(
            fileobj=io.BytesIO(path.read_bytes()),
            build_args=dict(build_args or {}),
            parent_env={"PATH": DEFAULT_PATH},
        )
        self.stages: list[Stage] = []
        bases = iter(self.parser.parent_images)
        for raw, context in zip(self.parser.structure, self.parser.context_structure,
                                strict=True):
            instruction = raw["instruction"]
            if instruction == "COMMENT":
                continue
            if instruction == "FROM":
                words = raw["value"].split()
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                self.stages.append(Stage(base=next(bases), name=name))
                continue
            if not self.stages:
                continue  # global ARGs: the parser carries them into each stage
            self.stages[-1].steps.append(Step(instruction, raw["value"], raw["startline"] + 1,
                                              dict(context.args), dict(context.envs)))

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ReplayError(f"{self.path.name}: no stage named {name!r}")

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.parser.labels)

    @property
    def envs(self) -> dict[str, str]:
        return dict(self.parser.envs)

    def copies_from(self, stage: Stage) -> list[tuple[str, list[str], str]]:
        """``(from, sources, dest)`` of each ``COPY --from=`` in ``stage``."""
        out = []
        for step in stage.all("COPY"):
            words = step.words()
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
            paths = [w for w in words if not w.startswith("--")]
            if "from" in flags:
                out.append((flags["from"], paths[:-1], paths[-1]))
        return out


def world_readable_python(candidates: Sequence[str]) -> Path | None:
    """The first Python 3.11 that a non-root user can run (every parent dir o+x)."""
    for candidate in candidates:
        found = shutil.which(candidate) if "/" not in candidate else candidate
        if not found or not Path(found).exists():
            continue
        real = Path(found).resolve()
        if all(p.stat().st_mode & stat.S_IXOTH for p in real.parents) and \
                real.stat().st_mode & stat.S_IXOTH:
            return real
    return None


def dev_constraints(python: str, uv: str, target: Path) -> Path:
    """The development venv's packages as a constraints file (this project left out)."""
    frozen = subprocess.run([uv, "pip", "freeze", "--python", python],
                            check=True, capture_output=True, text=True).stdout
    keep = [line for line in frozen.splitlines()
            if line and not line.startswith(("-e", "modelyard")) and " @ " not in line]
    target.write_text("\n".join(keep) + "\n")
    return target


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    home: str


class Replay:
    """Carry out a Dockerfile's stages in image roots under ``workdir``."""

    def __init__(self, dockerfile: Dockerfile, context: Path, workdir: Path, *, uv: str,
                 python: Path, constraints: Path) -> None:
        self.dockerfile = dockerfile
        self.context = context
        self.uv = uv
        self.python = python
        self.constraints = constraints
        self.roots: dict[str, Path] = {}
        self.users: dict[str, User] = {}
        self.log: list[str] = []
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # the image's user must reach into the final root
        self.workdir = workdir

    # ------------------------------------------------------------------ stages

    def build(self) -> Path:
        """Replay every stage; return the final stage's root."""
        root = Path()
        for index, stage in enumerate(self.dockerfile.stages):
            key = stage.name or f"stage-{index}"
            root = self.workdir / key
            root.mkdir(mode=0o755)
            self.roots[key] = root
            self._stage(stage, root)
        return root

    def _stage(self, stage: Stage, root: Path) -> None:
        cwd = "/"
        for step in stage.steps:
            if step.instruction == "WORKDIR":
                cwd = os.path.join(cwd, step.words()[0])
                self.host(root, cwd).mkdir(parents=True, exist_ok=True)
            elif step.instruction == "COPY":
                self._copy(step, root, cwd)
            elif step.instruction == "RUN":
                self._run(step, root, cwd)
            # ARG, ENV, LABEL, USER, EXPOSE, STOPSIGNAL, ENTRYPOINT, CMD: read by launch()

    def _copy(self, step: Step, root: Path, cwd: str) -> None:
        words = step.words()
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
        *sources, dest = [w for w in words if not w.startswith("--")]
        if "from" in flags and self.dockerfile.stage(flags["from"]).base.startswith(UV_IMAGE):
            return  # uv's image: the replay brings its own uv
        if "from" in flags:
            source_root = self.roots[flags["from"]]
            files = {s: self.host(source_root, s) for s in sources}
            included = None
        else:
            files = {s: self.context / s for s in sources}
            included = self._context_files()
        target = self.host(root, os.path.join(cwd, dest))
        into_dir = dest.endswith("/") or len(sources) > 1
        for name, path in files.items():
            if not path.exists():
                raise ReplayError(f"{self.dockerfile.path.name}:{step.line}: COPY source "
                                  f"{name} does not exist")
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    rel = file.relative_to(path)
                    if included is not None and \
                            file.relative_to(self.context).as_posix() not in included:
                        continue
                    self._put(file, target / rel)
            else:
                self._put(path, target / path.name if into_dir else target)

    def _context_files(self) -> set[str]:
        ignore = self.context / ".dockerignore"
        patterns = [] if not ignore.exists() else [
            line.strip() for line in ignore.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
        return set(exclude_paths(str(self.context), patterns))

    @staticmethod
    def _put(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)

    # --------------------------------------------------------------------- RUN

    def _run(self, step: Step, root: Path, cwd: str) -> None:
        words = [w for w in step.words() if not w.startswith("--mount=")]
        for command in _split_and(words):
            env: dict[str, str] = {}
            while command and "=" in command[0] and not command[0].startswith("-"):
                key, value = command.pop(0).split("=", 1)
                env[key] = value
            where = f"{self.dockerfile.path.name}:{step.line}"
            self.log.append(f"{where}: {' '.join(command)}")
            self._command(command, env, root, cwd, where)

    def _command(self, command: list[str], env: dict[str, str], root: Path, cwd: str,
                 where: str) -> None:
        program, *rest = command
        if command[:2] == ["uv", "build"]:
            opts = _options(rest[1:])
            if "--wheel" not in rest or "--out-dir" not in opts:
                raise ReplayError(f"{where}: expected `uv build --wheel --out-dir DIR`")
            out = self.host(root, opts["--out-dir"])
            self._exec([self.uv, "build", "--wheel", "--out-dir", str(out),
                        str(self.host(root, cwd))], where)
        elif command[:2] == ["uv", "venv"]:
            opts = _options(rest[1:])
            if opts.get("--python") != "3.11":
                raise ReplayError(f"{where}: the venv should ask for Python 3.11")
            venv = self.host(root, _positional(rest[1:])[0])
            # the interpreter is chosen here (a Debian 3.11 any uid can run), so the
            # command's UV_PYTHON_* settings, for bases without Python, do not apply
            self._exec([self.uv, "venv", "-q", "--python", str(self.python), str(venv)], where)
        elif command[:3] == ["uv", "pip", "install"]:
            self._exec(self._pip_install(rest[2:], root), where)
        elif program == "mkdir" and rest[:1] == ["-p"]:
            for path in rest[1:]:
                self.host(root, path).mkdir(parents=True, exist_ok=True)
        elif program == "chown":
            uid, gid = (int(x) for x in rest[0].split(":"))
            for path in rest[1:]:
                os.chown(self.host(root, path), uid, gid)
        elif program == "groupadd":
            return  # the group's id is what USER and useradd name: nothing to carry out
        elif command[:2] == ["apt-get", "update"]:
            return  # where packages come from: the machine's own Debian
        elif command[:2] == ["apt-get", "install"]:
            # the image's Debian packages are the machine's (the replay runs on its /usr):
            # each must be installed here, as scripts/system-packages.txt has them
            for package in (w for w in rest[1:] if not w.startswith("-")):  # apt's flags
                if not _debian_package_installed(package):
                    raise ReplayError(f"{where}: Debian package {package} is not installed "
                                      f"on this machine: scripts/system-packages.txt")
        elif program == "rm" and rest[:1] == ["-rf"]:
            for pattern in rest[1:]:
                if not pattern.startswith("/var/lib/apt/"):
                    raise ReplayError(f"{where}: the replay removes only apt's lists, "
                                      f"not {pattern}")
                # apt's lists were never written into the root: nothing to remove
        elif program == "useradd":
            opts = _options(rest)
            name = _positional(rest)[-1]
            user = User(int(opts["--uid"]), int(opts["--gid"]), opts.get("--home-dir", "/"))
            self.users[name] = user
            if "--create-home" in rest:
                home = self.host(root, user.home)
                home.mkdir(parents=True, exist_ok=True)
                os.chown(home, user.uid, user.gid)
        else:
            raise ReplayError(f"{where}: the replay does not know `{' '.join(command)}`; "
                              f"teach tests/packaging/dockerfile_replay.py")

    def _pip_install(self, args: list[str], root: Path) -> list[str]:
        out = [self.uv, "pip", "install", "-q", "--constraint", str(self.constraints)]
        it = iter(args)
        for word in it:
            if word in ("--no-cache",):
                continue  # where bytes come from: uv's cache is what keeps this fast
            if word == "--python":
                out += [word, str(self.host(root, next(it)))]
            elif word in ("--index-url", "--extra-index-url"):
                out += [word, next(it)]
            elif word.startswith("-"):
                out.append(word)
            elif " @ file://" in word:
                requirement, uri = word.split(" @ file://", 1)
                out.append(f"{requirement} @ file://{self.host(root, uri)}")
            else:
                out.append(word)
        return out

    def _exec(self, argv: list[str], where: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ReplayError(f"{where}: {' '.join(argv)} failed ({done.returncode}):\n"
                              f"{done.stdout}\n{done.stderr}")

    # ------------------------------------------------------------------ launch

    @staticmethod
    def host(root: Path, image_path: str) -> Path:
        return root / os.path.normpath(image_path).lstrip("/")

    def image_env(self, root: Path) -> dict[str, str]:
        """The final stage's ENV, each path that exists in the image mapped into ``root``."""
        env = {}
        for key, value in self.dockerfile.envs.items():
            parts = value.split(":")
            if all(p.startswith("/") for p in parts):
                parts = [str(self.host(root, p)) if self.host(root, p).exists() else p
                         for p in parts]
            env[key] = ":".join(parts)
        return env

    def user(self) -> User:
        step = self.dockerfile.final.last("USER")
        if step is None:
            return User(0, 0, "/root")
        name, _, group = step.words()[0].partition(":")
        if name.isdigit():
            uid = int(name)
            known = next((u for u in self.users.values() if u.uid == uid), None)
            gid = int(group) if group else (known.gid if known else uid)
            return User(uid, gid, known.home if known else "/")
        known = self.users[name]
        return User(known.uid, int(group) if group else known.gid, known.home)

    def argv(self, root: Path, args: Sequence[str] | None = None,
             command: Sequence[str] | None = None) -> list[str]:
        """ENTRYPOINT + CMD (or ``args`` in place of CMD, like ``docker run IMAGE ARGS``).

        ``command`` replaces ENTRYPOINT *and* CMD, as a Kubernetes container's ``command``
        does (its ``args`` then follow it; without ``command`` they replace CMD alone)."""
        final = self.dockerfile.final
        entry = final.last("ENTRYPOINT")
        cmd = final.last("CMD")
        entrypoint = entry.exec_form() if entry else []
        default = cmd.exec_form() if cmd else []
        if entrypoint is None or default is None:
            raise ReplayError(f"{self.dockerfile.path.name}: ENTRYPOINT/CMD not in exec form")
        if command is not None:
            entrypoint, default = list(command), []
        argv = [*entrypoint, *(default if args is None else args)]
        found = shutil.which(argv[0], path=self.image_env(root).get("PATH", DEFAULT_PATH))
        if found is None:
            raise ReplayError(f"{argv[0]} is not on the image's PATH")
        return [found, *argv[1:]]

    def launch(self, root: Path, args: Sequence[str] | None = None,
               env: Mapping[str, str] | None = None, command: Sequence[str] | None = None,
               **popen: Any) -> subprocess.Popen[bytes]:
        """Start the image's command like ``docker run [-e K=V] IMAGE [ARGS]`` would, or
        like a pod's container with ``command`` (and ``args``) would."""
        user = self.user()
        full_env = {"HOME": str(self.host(root, user.home)) if user.home != "/" else "/",
                    **self.image_env(root), **(env or {})}
        workdir = self.dockerfile.final.last("WORKDIR")
        cwd = self.host(root, workdir.words()[0] if workdir else "/")
        prefix = [] if user.uid == 0 else [
            "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
        process: subprocess.Popen[bytes] = subprocess.Popen(
            [*prefix, *self.argv(root, args, command)], env=full_env, cwd=cwd, **popen)
        return process


def _debian_package_installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "--show", "--showformat=${Status}", package],
                          capture_output=True, text=True, check=False)
    return done.returncode == 0 and done.stdout.strip().endswith(" installed")


def _split_and(words: list[str]) -> Iterator[list[str]]:
    command: list[str] = []
    for word in words:
        if word == "&&":
            yield command
            command = []
        elif word in (";", "||", "|") or word.startswith(("$(", "`")):
            raise ReplayError(f"shell construct {word!r}: keep RUN steps to `a && b`")
        else:
            command.append(word)
    if command:
        yield command


def _options(words: list[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs (a flag followed by a flag has no value)."""
    out: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--") and "=" in word:
            key, value = word.split("=", 1)
            out[key] = value
        elif word.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            out[word] = words[i + 1]
    return out


def _positional(words: list[str]) -> list[str]:
    """Words that are neither an option nor an option's value."""
    options = _options(words)
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            skip = word in options and "=" not in word
            continue
        out.append(word)
    return out
