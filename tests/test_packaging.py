"""What ``pip install`` gives: the core without the pipeline's dependencies, the wheel's contents
(package data, license, dependencies, console scripts), and the ``ltx2`` console script of an
installed (non-editable) wheel.

The subprocesses block modules with a ``sitecustomize`` written for the run (found first on
``PYTHONPATH``): it loads before any import of the program, as on a machine without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterable
from email.parser import Parser
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
#: Installed only with the ``pipeline`` extra.
ABSENT_WITHOUT_PIPELINE = ("diffusers", "av", "rich")
#: The core's own modules never import these. transformers is installed with peft (a core
#: dependency that imports it itself), so only the core's direct imports of it are refused.
CORE_NEVER_IMPORTS = (*ABSENT_WITHOUT_PIPELINE, "transformers")
CORE_DEPENDENCIES = {"torch", "peft", "transitions", "safetensors"}
PIPELINE_EXTRA = {"diffusers", "transformers", "rich", "av", "numpy"}
INSTALL_HINT = "pip install 'ltx2-residency[pipeline]'"

BLOCKER = '''
"""Written by tests/test_packaging.py: modules this run must not see."""
import builtins
import importlib.abc
import importlib.machinery
import sys

ABSENT = {absent!r}
FORBIDDEN_TO = {forbidden!r}  # importer package -> modules it must not import itself


class _Absent(importlib.abc.MetaPathFinder):
    """The path finder, blind to ABSENT: not found, as if not installed (find_spec() is None too)."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

    def find_distributions(self, *args, **kwargs):  # importlib.metadata: their metadata is gone too
        found = importlib.machinery.PathFinder.find_distributions(*args, **kwargs)
        return (d for d in found if (d.metadata["Name"] or "").lower() not in ABSENT)


sys.meta_path[:] = [_Absent() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
_import = builtins.__import__


def _guarded(name, globals=None, locals=None, fromlist=(), level=0):
    # every import statement passes here, also for a module already loaded by another package
    importer = (globals or {{}}).get("__name__") or ""
    top = name.partition(".")[0]
    if level == 0 and top in FORBIDDEN_TO.get(importer.partition(".")[0], ()):
        raise ModuleNotFoundError(f"{{importer}} imports {{name}}, which it must not", name=top)
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _guarded
'''

CORE_REQUEST = textwrap.dedent('''
    import sys

    import torch
    from ltx2_residency import LoRASpec, ResidencyManager, WeightState
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(torch.bfloat16)
    rank = 4
    save_file({f"{i}.lora_{part}.weight": torch.randn(*shape).mul(0.1).to(torch.bfloat16).contiguous()
               for i, layer in ((0, model[0]), (2, model[2]))
               for part, shape in (("A", (rank, layer.in_features)), ("B", (layer.out_features, rank)))},
              sys.argv[1])
    params = list(model.parameters())  # the same tensors once PEFT has wrapped the layers
    clean = [p.detach().clone() for p in params]
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    mgr = ResidencyManager(model, loras=[LoRASpec("distilled", sys.argv[1], {"stage1": 0.0, "stage2": 1.0})],
                           merge_policy="merge")
    for policy in ("merge", "dynamic"):
        mgr.set_merge_policy(policy)
        with torch.no_grad(), mgr.request() as req:
            base = req.enter("stage1")(x)
            adapted = req.enter("stage2")(x)
        assert not torch.equal(base, adapted), "the LoRA had no effect"
        assert mgr.state is WeightState.CLEAN
        mgr.verify_clean()
        assert all(torch.equal(c, p) for c, p in zip(clean, params, strict=True))
    print("core request ok", [r.event for r in mgr.trace][:4])
''')


def _write_blocker(folder: Path, absent: Iterable[str], forbidden: dict[str, Iterable[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    source = BLOCKER.format(absent=set(absent), forbidden={k: set(v) for k, v in forbidden.items()})
    (folder / "sitecustomize.py").write_text(source)
    return folder


def _run(args: list[str], pythonpath: Iterable[Path], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _core_request(tmp_path: Path, *path: Path) -> subprocess.CompletedProcess:
    blocker = _write_blocker(tmp_path / "block", ABSENT_WITHOUT_PIPELINE, {"ltx2_residency": CORE_NEVER_IMPORTS})
    script = tmp_path / "core_request.py"
    script.write_text(CORE_REQUEST)
    return _run([sys.executable, str(script), str(tmp_path / "lora.safetensors")], [blocker, *path], cwd=tmp_path)


# ---------------------------------------------------------------------------- the core alone
def test_the_core_runs_a_request_without_the_pipelines_dependencies(tmp_path: Path) -> None:
    run = _core_request(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "core request ok" in run.stdout


@pytest.mark.parametrize("module", ["diffusers", "transformers"])
def test_a_core_module_importing_a_pipeline_dependency_fails_the_check(tmp_path: Path, module: str) -> None:
    # the check itself: the same run over a copy of the core in which one module imports `module`
    # (transformers may be loaded by peft by then: the guard looks at the importer, not at sys.modules)
    core = tmp_path / "site" / "ltx2_residency"
    shutil.copytree(ROOT / "src" / "ltx2_residency", core, ignore=shutil.ignore_patterns("__pycache__"))
    trace = core / "trace.py"
    trace.write_text(trace.read_text() + f"\nimport {module}  # noqa\n")
    run = _core_request(tmp_path, tmp_path / "site")
    assert run.returncode != 0 and "core request ok" not in run.stdout
    assert f"ltx2_residency.trace imports {module}, which it must not" in run.stderr, run.stderr


# ---------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline from a copy of what the sdist holds (the working tree is
    never written to)."""
    try:
        import setuptools
    except ImportError:
        setuptools = None
    if setuptools is None or int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building the wheel offline needs setuptools>=77 here (pip install -e '.[test]')")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    for package in ("ltx2_residency", "ltx2_pipeline", "ltx2_tools"):
        shutil.copytree(ROOT / "src" / package, tree / "src" / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tree / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                            "--no-index", "--quiet", "-w", str(dist)], cwd=tree, capture_output=True, text=True,
                           timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    [built] = dist.glob("ltx2_residency-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (not editable) into a folder of its own; the dependencies are this venv's."""
    site = tmp_path_factory.mktemp("site")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                              "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    return site


def test_the_wheel_ships_the_baselines_the_license_and_a_core_without_the_pipeline(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        shipped = whl.read("ltx2_tools/perf_baselines.json")
        [info] = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
        scripts = whl.read(f"{info}/entry_points.txt").decode()
    assert shipped == (ROOT / "src" / "ltx2_tools" / "perf_baselines.json").read_bytes()
    assert {"ltx2_residency/py.typed", "ltx2_pipeline/py.typed", "ltx2_tools/py.typed"} <= names
    assert f"{info}/licenses/LICENSE" in names and metadata["License-Expression"] == "Apache-2.0"
    requires = [r.replace(" ", "") for r in metadata.get_all("Requires-Dist")]
    unconditional = {r.split(";")[0].split(">")[0].split("=")[0] for r in requires if ";" not in r}
    assert unconditional == CORE_DEPENDENCIES
    pipeline = {r.split(">")[0].split("=")[0].split(";")[0] for r in requires if 'extra=="pipeline"' in r}
    assert pipeline == PIPELINE_EXTRA
    assert "pipeline" in metadata.get_all("Provides-Extra")
    assert "ltx2 = ltx2_pipeline._console:ltx2" in scripts and "ltx2-demo = ltx2_pipeline._console:demo" in scripts


def test_the_installed_package_finds_its_baselines_through_importlib_resources(installed: Path,
                                                                              tmp_path: Path) -> None:
    code = ("import importlib.resources, json, ltx2_tools; "
            "f = importlib.resources.files('ltx2_tools') / 'perf_baselines.json'; "
            "cases = list(json.loads(f.read_text())['cases']); "
            "print(json.dumps([ltx2_tools.__file__, str(f), f.is_file(), cases]))")
    run = _run([sys.executable, "-c", code], [installed], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    package, baselines, is_file, cases = json.loads(run.stdout)
    assert Path(package).is_relative_to(installed) and Path(baselines).is_relative_to(installed) and is_file
    assert "tiny_cpu_normal_merge" in cases


def _script(installed: Path, name: str = "ltx2") -> Path:
    script = installed / "bin" / name
    assert script.is_file(), sorted(p.name for p in (installed / "bin").iterdir())
    return script


def test_installed_perf_check_lists_the_shipped_cases(installed: Path, tmp_path: Path) -> None:
    # outside any checkout: the default baselines come with the package
    run = _run([sys.executable, str(_script(installed)), "perf-check", "--list"], [installed], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "tiny_cpu_normal_merge" in run.stdout and "full_h100_normal_merge" in run.stdout


def test_installed_perf_check_reads_the_baselines_it_is_given(installed: Path, tmp_path: Path) -> None:
    given = tmp_path / "mine.json"
    case = {"preset": "tiny", "device": "cpu", "status": "to be measured"}
    given.write_text(json.dumps({"cases": {"only_mine": case, "and_this": {**case, "variant": "hq"}}}))
    run = _run([sys.executable, str(_script(installed)), "perf-check", "--list", "--baselines", str(given)],
               [installed], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()] == ["only_mine", "and_this"]


@pytest.mark.parametrize(("script", "absent"), [
    ("ltx2", ("diffusers",)),
    ("ltx2-demo", ABSENT_WITHOUT_PIPELINE),  # `pip install ltx2-residency`: none of the extra's own modules
])
def test_the_console_scripts_without_the_pipeline_extra_say_what_to_install(
        installed: Path, tmp_path: Path, script: str, absent: tuple[str, ...]) -> None:
    blocker = _write_blocker(tmp_path / "block", absent, {})
    run = _run([sys.executable, str(_script(installed, script)), *(["generate"] if script == "ltx2" else [])],
               [blocker, installed], cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    [line] = run.stderr.strip().splitlines()
    missing = line.split()[2]
    assert missing in absent
    assert line == f"error: {script}: {missing} is not installed; {script} needs the pipeline extra: {INSTALL_HINT}"
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------- CI
def test_ci_runs_hypothesis_derandomized() -> None:
    assert "export CI=true" in (ROOT / ".ci" / "run").read_text()
    assert settings.get_profile("ci").derandomize and settings.get_profile("ci").database is None
    if os.environ.get("CI") and not os.environ.get("HYPOTHESIS_PROFILE"):
        assert settings.default.derandomize
