"""What a non-editable install (a wheel) carries besides the Python modules: every config of
configs/ as the package data of `detkit.configs`, one console script per tool, and a
`detkit.config.compose.CONFIG_DIR` that finds the installed configs (the checkout's otherwise).

Read from pyproject.toml and setup.py without building anything (building a wheel compiles
the extension: minutes)."""
from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli, a test dependency there (pyproject.toml [test])
    import tomli as tomllib


@pytest.fixture(scope="module")
def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def setup_py_packages() -> list[str]:
    """The package list setup.py passes to setup(): its `_packages()` run on its own."""
    from setuptools import find_namespace_packages

    tree = ast.parse((REPO / "setup.py").read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "_packages")
    namespace = {"find_namespace_packages": find_namespace_packages, "os": os, "ROOT": str(REPO)}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["_packages"]()


def test_every_config_is_package_data(setuptools_table):
    configs = REPO / "configs"
    assert setuptools_table["package-dir"]["detkit.configs"] == "configs"
    patterns = setuptools_table["package-data"]["detkit.configs"]
    declared = {Path(p) for pattern in patterns for p in glob.glob(pattern, root_dir=configs, recursive=True)}
    every = {p.relative_to(configs) for p in configs.rglob("*.yaml")}
    assert any(len(p.parts) > 2 for p in every)          # nested groups (model/ablation/...) exist
    assert every - declared == set()
    assert {p for p in declared if (configs / p).is_file()} == every   # and nothing but the YAML files


def test_setup_py_installs_every_package_and_the_configs():
    packages = setup_py_packages()
    configs = REPO / "configs"
    groups = {".".join(("detkit", "configs", *d.relative_to(configs).parts)) for d in configs.rglob("*") if d.is_dir()}
    assert {"detkit.configs", "detkit.configs.model.ablation"} | groups <= set(packages)
    found = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "detkit").rglob("__init__.py")}
    assert found - set(packages) == set()
    assert {"detkit", "detkit.cli", "detkit.modeling.backbone"} <= found


def test_one_console_script_per_tool():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    tools = sorted(p.stem for p in (REPO / "tools").glob("*.py"))
    assert sorted(scripts) == sorted("detkit-" + tool.replace("_", "-") for tool in tools)
    for tool in tools:
        target = scripts["detkit-" + tool.replace("_", "-")]
        # the library's tools in detkit.cli, the reproduction study's in detkit.study.cli
        assert target in (f"detkit.cli.{tool}:main", f"detkit.study.cli.{tool}:main")
        module = target.removesuffix(":main")
        assert callable(importlib.import_module(module).main)
        shim = (REPO / "tools" / f"{tool}.py").read_text()
        assert f"from {module} import main" in shim and "sys.path" not in shim


def load_cli_package(root: Path):
    """detkit/config/compose.py executed as if installed under `root` (root/detkit/config/)."""
    target = root / "detkit" / "config"
    target.mkdir(parents=True)
    shutil.copy(REPO / "detkit" / "config" / "compose.py", target / "compose.py")
    spec = importlib.util.spec_from_file_location("detkit_compose_copy", target / "compose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_dir_prefers_the_installed_package_data(tmp_path):
    import detkit
    from detkit.config.compose import CONFIG_DIR

    if Path(detkit.__file__).resolve().parent == REPO / "detkit":   # this checkout (editable install)
        assert CONFIG_DIR == REPO / "configs"
    (tmp_path / "wheel" / "detkit" / "configs").mkdir(parents=True)
    assert load_cli_package(tmp_path / "wheel").CONFIG_DIR == (tmp_path / "wheel" / "detkit" / "configs").resolve()
    assert load_cli_package(tmp_path / "checkout").CONFIG_DIR == (tmp_path / "checkout" / "configs").resolve()
