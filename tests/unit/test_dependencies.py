"""pyproject.toml declares what the service imports at run time, and nothing it doesn't need."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from tests.unit.test_layers import LAYERS, layered_files

REPO = Path(__file__).resolve().parents[2]
# Declared without an import of ours, each for the reason pyproject.toml gives beside it.
NEEDED_WITHOUT_IMPORT = {
    "sse-starlette": "langserve's streaming endpoints import it",
    "python-multipart": "Starlette's form parser (POST /documents uploads) imports it",
    "markdownify": "langchain-community's MarkdownifyTransformer (loaders/formats.py) imports it",
    "accelerate": "transformers' Trainer (sentence-transformers' trainer, rag tune) requires it",
}


def canonical(name: str) -> str:
    """A distribution's name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {canonical(re.match(r"[A-Za-z0-9._-]+", line)[0]) for line in project["dependencies"]}  # type: ignore[index]


@functools.cache
def providers() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def imported_modules() -> dict[str, set[str]]:
    """Third-party modules imported by the shipped code (anywhere in a file), with the files."""
    found: dict[str, set[str]] = {}
    for path in layered_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in LAYERS:
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


@functools.cache
def distributions_of(module: str) -> set[str]:
    """The installed distributions that could provide `module` (a namespace may have several)."""
    top = module.partition(".")[0]
    names = {canonical(d) for d in providers().get(top, [])}
    assert names, f"no installed distribution provides {top!r}"
    if len(names) > 1:  # e.g. pymilvus and pymilvus-model share `pymilvus`: ask the files
        owners = set()
        for name in names:
            files = importlib.metadata.distribution(name).files or []
            prefix = module.replace(".", "/")
            if any(str(f).startswith((prefix + "/", prefix + ".py")) for f in files):
                owners.add(name)
        names = owners or names
    return names


def test_every_third_party_import_is_a_declared_dependency() -> None:
    wanted = declared()
    missing = {
        module: sorted(files)
        for module, files in imported_modules().items()
        if not distributions_of(module) & wanted
    }
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def test_every_declared_dependency_is_imported_or_has_a_reason() -> None:
    used = {name for module in imported_modules() for name in distributions_of(module)}
    unused = declared() - used - set(NEEDED_WITHOUT_IMPORT)
    assert not unused, f"declared but never imported (remove, or say why in NEEDED_WITHOUT_IMPORT): {unused}"
    stale = set(NEEDED_WITHOUT_IMPORT) & used
    assert not stale, f"imported after all, so no longer an exception: {stale}"


def test_the_observability_log_formatter_is_a_declared_dependency() -> None:
    # Named in a logging config (a string), so the import scan above only sees it through
    # the import of its field list.
    assert "python-json-logger" in declared()
    assert "pythonjsonlogger" in {m.partition(".")[0] for m in imported_modules()}
