"""Imports run one way: loaders, then store, then chains, then the app (and nothing at import)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Lower numbers are lower layers; a module may import its own layer and the ones below.
LAYERS = {
    "settings": 0,
    "errors": 0,
    "api_keys": 0,
    "loaders": 1,
    "store": 2,
    "chains": 3,
    "service": 4,
    "openai_api": 4,
    "pages": 4,
    "server": 4,
    "workers": 4,
    "observability": 4,
    "cli": 4,
    "mcp_server": 4,
    "documents_api": 4,
    "limits": 4,
    "access": 4,
}


def test_every_module_of_the_project_has_a_layer() -> None:
    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(shipped["py-modules"]) | set(shipped["packages"]) == set(LAYERS)
    assert {p.stem for p in REPO.glob("*.py")} <= set(LAYERS)


def top_package(path: Path) -> str:
    relative = path.relative_to(REPO)
    return relative.parts[0].removesuffix(".py")


def project_imports(path: Path) -> set[str]:
    """Top-level project names that a file imports, anywhere in it (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYERS | {"tests": 9})
    return found


def layered_files() -> list[Path]:
    files = [REPO / f"{name}.py" for name, _ in LAYERS.items() if (REPO / f"{name}.py").is_file()]
    for package in ("loaders", "store", "chains"):
        files.extend(sorted((REPO / package).rglob("*.py")))
    return files


@pytest.mark.parametrize("path", layered_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_a_module_imports_only_its_own_layer_and_those_below(path: Path) -> None:
    own = LAYERS[top_package(path)]
    upward = {name for name in project_imports(path) if name == "tests" or LAYERS[name] > own}
    assert not upward, f"{path.relative_to(REPO)} imports a higher layer: {sorted(upward)}"


def test_importing_every_module_reads_no_settings_and_touches_no_environment() -> None:
    """Nothing happens at import: no settings read, no os.environ change, no pymilvus loaded."""
    modules = [
        "settings",
        "errors",
        "loaders.markdown",
        "loaders.sources",
        "store.milvus",
        "store.lite_file",
        "store.indexing",
        "store.embeddings",
        "chains.retrieval",
        "chains.rag",
        "chains.llm",
        "chains.tools",
        "service",
        "openai_api",
        "pages",
        "server",
        "observability",
        "cli",
        "workers",
        "mcp_server",
        "api_keys",
        "access",
        "documents_api",
        "limits",
    ]
    script = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "import settings\n"
        "assert settings.get_settings.cache_info().currsize == 0, 'settings were read at import'\n"
        "assert dict(os.environ) == before, 'the environment changed at import'\n"
        "assert 'pymilvus' not in sys.modules, 'pymilvus was imported at import time'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "MILVUS_URI": "./not-a-url.db"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def bench_files() -> list[Path]:
    return sorted((REPO / "bench").rglob("*.py"))


@pytest.mark.parametrize("path", bench_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_benchmarks_import_nothing_from_the_tests(path: Path) -> None:
    """bench/ runs the tests' LLM server as a program (python tests/llm_server.py), never imports it."""
    assert "tests" not in project_imports(path), f"{path.relative_to(REPO)} imports from tests/"


def test_the_import_check_sees_an_import_of_the_tests_anywhere(tmp_path: Path) -> None:
    # So that the check above cannot pass for want of looking.
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef upstream():\n    from tests.llm_server import LLMServer\n")
    assert project_imports(probe) == {"tests"}
    probe.write_text("import tests.llm_server as upstream\n")
    assert project_imports(probe) == {"tests"}
