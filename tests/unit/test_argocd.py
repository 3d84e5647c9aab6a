"""The Argo CD health check and resource actions for ModelDeployment, run by Argo CD itself.

Argo CD's own offline commands (``argocd admin settings resource-overrides health``,
``list-actions`` and ``run-action``, from the Argo CD built by scripts/prepare.py) evaluate
the scripts exactly as registered in ``argocd/argocd-cm.yaml`` against the fixtures in Argo
CD's test layout: ``argocd/health_test.yaml`` and ``argocd/actions/action_test.yaml``.

One thing Argo CD's commands cannot do is stop the clock, so the tokens that abort and retry
write within one second (``-2``, ``-3``...) are checked in Lua 5.1 (``lupa.lua51``, the
language of Argo CD's gopher-lua) inside an environment holding only what Argo CD gives a
custom script (``util/lua/lua.go``): the base library, ``table``, and ``require("os")``
returning a table with only ``date`` and ``time``, whose ``os.date`` formats like gopher-lua's
``strftime`` subset.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

try:
    import lupa.lua51 as lua  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - the dev extra installs lupa
    try:
        import lupa.luajit21 as lua  # type: ignore[import-untyped]  # Lua 5.1 too
    except ImportError:
        pytest.fail("tests/unit/test_argocd.py needs lupa with a Lua 5.1 runtime: "
                    "`.venv/bin/uv pip install -p .venv/bin/python lupa` (the dev extra "
                    "lists it)", pytrace=False)

ARGOCD = Path(__file__).resolve().parents[2] / "argocd"
ACTIONS = ARGOCD / "actions"
HEALTH_STATUSES = {"Healthy", "Progressing", "Suspended", "Degraded", "Missing", "Unknown"}
STOPPED_CLOCK = dt.datetime(2026, 11, 25, 10, 10, 0, tzinfo=dt.UTC)  # see action_test.yaml
Clock = Callable[[], dt.datetime]

# What gopher-lua's OpenBase and OpenTable define (dofile/loadfile left out: no files here).
_BASE = ("assert error getmetatable ipairs next pairs pcall print rawequal rawget rawset "
         "select setmetatable tonumber tostring type unpack xpcall _VERSION loadstring "
         "getfenv setfenv")
_SANDBOX = """
return function(source, name, obj, date, time, base)
  local env = {}
  for _, key in ipairs(base) do env[key] = _G[key] end
  env.table = {concat = table.concat, insert = table.insert, remove = table.remove,
               sort = table.sort, getn = table.getn, maxn = table.maxn}
  local os = {date = date, time = time}
  env.require = function(module)
    if module == "os" then return os end
    error("module " .. tostring(module) .. " not found", 2)
  end
  env._G = env
  env.obj = obj
  local chunk, err = loadstring(source, "=" .. name)
  if chunk == nil then error(err, 0) end
  setfenv(chunk, env)
  return chunk()
end
"""

# gopher-lua's strftime knows these flags (Argo CD's copy in util/lua/oslib_safe.go); any
# other %X is written out as is.
_DATE_FLAGS = {
    "a": "%a", "A": "%A", "b": "%b", "B": "%B", "c": "%d %b %y %H:%M %Z", "d": "%d",
    "F": "%Y-%m-%d", "H": "%H", "I": "%I", "m": "%m", "M": "%M", "p": "%p", "S": "%S",
    "x": "%H/%M/%S", "X": "%H:%M:%S", "y": "%y", "Y": "%Y", "z": "%z", "Z": "%Z", "w": "%w",
}


def _os_date(clock: Clock) -> Callable[..., str]:
    def date(fmt: str = "%c", when: float | None = None) -> str:
        t = clock() if when is None else dt.datetime.fromtimestamp(when, dt.UTC)
        if fmt.startswith("!"):
            t, fmt = t.astimezone(dt.UTC), fmt.lstrip("!")
        else:
            t = t.astimezone()
        if fmt.startswith("*t"):
            raise ValueError("os.date('*t') is not used by these scripts")
        return re.sub(r"%(.)", lambda m: t.strftime(_DATE_FLAGS[m[1]]) if m[1] in _DATE_FLAGS
                      else m[0], fmt.replace("%%", "\0")).replace("\0", "%")
    return date


class ArgoLua:
    """Runs one script the way Argo CD's ``VM.runLua`` does, in a fresh Lua state."""

    def __init__(self, clock: Clock = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.clock = clock

    def run(self, script: Path, obj: dict[str, Any]) -> Any:
        return self.run_source(script.read_text(), script.relative_to(ARGOCD).as_posix(), obj)

    def run_source(self, source: str, name: str, obj: dict[str, Any]) -> Any:
        runtime = lua.LuaRuntime()
        runtime.execute("debug.setmetatable('', nil)")  # gopher-lua: no string methods
        sandbox = runtime.execute(_SANDBOX)
        result = sandbox(source, name, runtime.table_from(obj, recursive=True),
                         _os_date(self.clock), lambda: int(self.clock().timestamp()),
                         runtime.table_from(_BASE.split()))
        return _to_python(result, obj)


def _to_python(value: Any, like: Any) -> Any:
    """A Lua value as JSON-like Python; an empty table takes the shape of ``like``, as Argo
    CD's ``cleanReturnedObj`` does."""
    if lua.lua_type(value) == "table":
        keys = list(value.keys())
        if not keys:
            return [] if isinstance(like, list) else {}
        if keys == list(range(1, len(keys) + 1)):
            items = like if isinstance(like, list) else []
            return [_to_python(value[k], items[k - 1] if k <= len(items) else None)
                    for k in keys]
        mapping = like if isinstance(like, dict) else {}
        return {str(k): _to_python(value[k], mapping.get(str(k))) for k in keys}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _cases(path: Path, key: str) -> list[Any]:
    return [pytest.param(case, id=f"{case.get('action', '')}:{Path(case['inputPath']).stem}"
                         .lstrip(":")) for case in _load(path)[key]]


def act_in_lua(name: str, obj: dict[str, Any],
               clock: Clock = lambda: STOPPED_CLOCK) -> dict[str, Any]:
    result: dict[str, Any] = ArgoLua(clock).run(ACTIONS / name / "action.lua", obj)
    return result


class ArgoAdmin:
    """Argo CD's offline ``argocd admin settings resource-overrides`` commands, with the
    customizations registered from ``argocd/argocd-cm.yaml``."""

    def __init__(self, cli: Path, tmp: Path):
        self.cli, self.tmp = cli, tmp

    def run(self, command: str, obj: dict[str, Any], *args: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        resource = self.tmp / f"{obj['metadata']['name']}.yaml"
        resource.write_text(yaml.safe_dump(obj))
        return subprocess.run(
            [str(self.cli), "admin", "settings", "resource-overrides", command, str(resource),
             *args, "--argocd-cm-path", str(ARGOCD / "argocd-cm.yaml")],
            capture_output=True, text=True, check=False, timeout=60,
            env={**os.environ, "HOME": str(self.tmp), "KUBECONFIG": str(self.tmp / "none"),
                 **(env or {})})

    def health(self, obj: dict[str, Any]) -> dict[str, Any]:
        proc = self.run("health", obj)
        assert proc.returncode == 0, proc.stderr
        found = re.fullmatch(r"STATUS: (.*)\nMESSAGE: (.*)\n", proc.stdout, re.DOTALL)
        assert found, proc.stdout
        return {"status": found[1], "message": found[2]}

    def discover(self, obj: dict[str, Any]) -> dict[str, bool]:
        """action name -> disabled, as ``list-actions`` prints them."""
        proc = self.run("list-actions", obj)
        assert proc.returncode == 0, proc.stderr
        header, *rows = proc.stdout.splitlines()
        assert header.split() == ["NAME", "DISABLED"]
        return {name: disabled == "true" for name, disabled in (r.split() for r in rows)}

    def act(self, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        """The resource as ``run-action`` leaves it (its diff tool shows the new object)."""
        proc = self.run("run-action", obj, name,
                        env={"KUBECTL_EXTERNAL_DIFF": """sh -c 'cat "$2"' sh"""})
        if proc.returncode != 0:
            raise ActionRefused(proc.stderr + proc.stdout)
        _, _, shown = proc.stdout.partition("Following fields have been changed:\n\n")
        result: dict[str, Any] = yaml.safe_load(shown)
        return result


class ActionRefused(Exception):
    pass


@pytest.fixture(scope="module")
def argo(tmp_path_factory: pytest.TempPathFactory) -> ArgoAdmin:
    from modelyard.operator.devcluster.argocd import ensure_argocd

    return ArgoAdmin(ensure_argocd().cli, tmp_path_factory.mktemp("argocd-admin"))


# ----------------------------------------------------------------------------- health


@pytest.mark.parametrize("case", _cases(ARGOCD / "health_test.yaml", "tests"))
def test_health(argo: ArgoAdmin, case: dict[str, Any]) -> None:
    got = argo.health(_load(ARGOCD / case["inputPath"]))
    assert got == case["healthStatus"]
    assert got["status"] in HEALTH_STATUSES


def test_health_cases_cover_every_status_the_script_returns() -> None:
    cases = _load(ARGOCD / "health_test.yaml")["tests"]
    assert {c["healthStatus"]["status"] for c in cases} == {
        "Healthy", "Progressing", "Suspended", "Degraded"}
    assert len({c["inputPath"] for c in cases}) == len(cases)
    fixtures = {f"testdata/{p.name}" for p in (ARGOCD / "testdata").glob("*.yaml")}
    assert fixtures == {c["inputPath"] for c in cases}, "every fixture has its health case"


def test_a_spec_the_operator_has_not_seen_is_progressing_whatever_the_old_status_says(
        argo: ArgoAdmin) -> None:
    obj = _load(ARGOCD / "testdata/healthy_serving.yaml")
    assert argo.health(obj)["status"] == "Healthy"
    obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
    assert argo.health(obj) == {"status": "Progressing",
                                "message": "Waiting for the operator to observe generation 5"}
    obj["status"]["observedGeneration"] = obj["metadata"]["generation"]
    assert argo.health(obj)["status"] == "Healthy"


def test_a_paused_canary_is_suspended_only_while_paused(argo: ArgoAdmin) -> None:
    obj = _load(ARGOCD / "testdata/suspended_manualPromote.yaml")
    assert argo.health(obj)["status"] == "Suspended"
    obj["status"]["canary"]["paused"] = False
    assert argo.health(obj) == {"status": "Progressing",
                                "message": "Canary: step 3/3: 75% of traffic; waiting for promote"}


# ---------------------------------------------------------------------------- actions


@pytest.mark.parametrize("case", _cases(ACTIONS / "action_test.yaml", "discoveryTests"))
def test_discovery(argo: ArgoAdmin, case: dict[str, Any]) -> None:
    got = argo.discover(_load(ACTIONS / case["inputPath"]))
    assert got == {a["name"]: a["disabled"] for a in case["result"]}


@pytest.mark.parametrize("case", _cases(ACTIONS / "action_test.yaml", "actionTests"))
def test_action(argo: ArgoAdmin, case: dict[str, Any]) -> None:
    """Argo CD runs each action on the real clock: abort and retry write the current UTC
    second (a fresh token), everything else is exactly the expected output."""
    before = _load(ACTIONS / case["inputPath"])
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    after = argo.act(case["action"], before)
    expected = _load(ACTIONS / case["expectedOutputPath"])
    key = f"modelyard.dev/{case['action']}"
    if case["action"] in ("abort", "retry"):
        token = after["metadata"]["annotations"].pop(key)
        expected["metadata"]["annotations"].pop(key)
        stamp = dt.datetime.strptime(token[:20], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        assert started <= stamp <= dt.datetime.now(dt.UTC)
        assert token != (before["metadata"].get("annotations") or {}).get(key)
    assert after == expected
    assert after["spec"] == before["spec"], "an action never touches spec (no drift in Git)"


def test_action_tokens_within_one_second(argo: ArgoAdmin) -> None:
    """With Argo CD's clock stopped (Lua 5.1, Argo CD's sandbox), each case's token is
    exactly the expected one: ``-2`` when the second's plain token is taken."""
    for case in _load(ACTIONS / "action_test.yaml")["actionTests"]:
        after = act_in_lua(case["action"], _load(ACTIONS / case["inputPath"]))
        assert after == _load(ACTIONS / case["expectedOutputPath"]), case


def test_every_action_has_a_script_a_discovery_entry_and_a_case(argo: ArgoAdmin) -> None:
    scripts = {p.parent.name for p in ACTIONS.glob("*/action.lua")}
    assert scripts == {"promote", "abort", "retry"}
    assert set(argo.discover(_load(ARGOCD / "testdata/healthy_serving.yaml"))) == scripts
    tests = _load(ACTIONS / "action_test.yaml")
    assert {c["action"] for c in tests["actionTests"]} == scripts
    states = {(a["name"], a["disabled"]) for c in tests["discoveryTests"] for a in c["result"]}
    assert states == {(name, d) for name in scripts for d in (True, False)}, (
        "each action is seen both enabled and disabled")


@pytest.mark.parametrize(("action", "fixture", "why"), [
    ("promote", "testdata/healthy_serving.yaml", "no canary in progress"),
    ("abort", "testdata/healthy_serving.yaml", "no rollout in progress"),
    ("abort", "testdata/progressing_noStatus.yaml", "no rollout in progress"),
    ("retry", "testdata/progressing_canary.yaml", "nothing to retry"),
    ("retry", "actions/testdata/rolledBack_specRevertedToStable.yaml", "nothing to retry"),
])
def test_a_disabled_action_refuses_with_a_reason(argo: ArgoAdmin, action: str, fixture: str,
                                                 why: str) -> None:
    obj = _load(ARGOCD / fixture)
    assert argo.discover(obj)[action] is True
    with pytest.raises(ActionRefused, match=why):
        argo.act(action, obj)


def test_each_click_is_a_new_request_even_within_one_second() -> None:
    obj = _load(ARGOCD / "testdata/progressing_canary.yaml")
    handled: dict[str, str] = {}
    seen: list[str] = []
    for operator_handles_it in (True, False, False, True, True, False):
        obj["status"]["handledRequests"] = dict(handled)
        obj = act_in_lua("abort", obj)  # every click at the same stopped second
        token = obj["metadata"]["annotations"]["modelyard.dev/abort"]
        assert token != handled.get("abort"), "the operator must see a request it has not done"
        assert not seen or token != seen[-1], "the annotation changes, so Argo CD patches it"
        seen.append(token)
        if operator_handles_it:
            handled["abort"] = token
    assert all(t.startswith("2026-11-25T10:10:00Z") for t in seen)


def test_the_lua_sandbox_gives_only_what_argo_cd_gives(argo: ArgoAdmin) -> None:
    """The emulation above is only trusted where it matches Argo CD: a script probing its
    environment gets the same answers from both."""
    probe = ('local os = require("os")\n'
             "hs = {status = 'Healthy', message = type(string) .. ' ' .. type(math) .. ' ' ..\n"
             "      type(io) .. ' ' .. type(_G.os) .. ' ' .. os.date('!%Y %T', 0)}\n"
             "return hs\n")
    emulated = ArgoLua(lambda: STOPPED_CLOCK).run_source(probe, "probe.lua", {})
    configmap = _load(ARGOCD / "argocd-cm.yaml")
    configmap["data"] = {"resource.customizations.health.modelyard.dev_ModelDeployment": probe}
    argo.tmp.joinpath("probe-cm.yaml").write_text(yaml.safe_dump(configmap))
    resource = argo.tmp / "probe.yaml"
    resource.write_text(yaml.safe_dump({"apiVersion": "modelyard.dev/v1alpha1",
                                        "kind": "ModelDeployment",
                                        "metadata": {"name": "probe"}}))
    proc = subprocess.run(
        [str(argo.cli), "admin", "settings", "resource-overrides", "health", str(resource),
         "--argocd-cm-path", str(argo.tmp / "probe-cm.yaml")],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "HOME": str(argo.tmp), "KUBECONFIG": str(argo.tmp / "none")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"STATUS: Healthy\nMESSAGE: {emulated['message']}\n"
    assert emulated["message"] == "nil nil nil nil 1970 %T"


# ---------------------------------------------------------------- argocd-cm and docs


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("argocd_generate", ARGOCD / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_argocd_cm_and_the_docs_embed_exactly_the_current_scripts() -> None:
    generate = _generator()
    assert generate.main(["--check"]) == 0, (
        "argocd/argocd-cm.yaml or docs/gitops.md is stale: run "
        "`.venv/bin/python argocd/generate.py`")
    configmap = _load(ARGOCD / "argocd-cm.yaml")
    data = configmap["data"]
    assert data[generate.HEALTH_KEY] == (ARGOCD / "health.lua").read_text()
    actions = yaml.safe_load(data[generate.ACTIONS_KEY])
    assert actions["discovery.lua"] == (ACTIONS / "discovery.lua").read_text()
    assert {d["name"]: d["action.lua"] for d in actions["definitions"]} == {
        p.parent.name: p.read_text() for p in ACTIONS.glob("*/action.lua")}
    doc = (ARGOCD.parent / "docs" / "gitops.md").read_text()
    assert f"```yaml\n{(ARGOCD / 'argocd-cm.yaml').read_text()}```" in doc
