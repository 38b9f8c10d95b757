"""Every third-party import is declared in setup.py: the package's module-level imports in install_requires, its
function-level (optional) imports in install_requires or an extra, and what tests and tools import in
install_requires or the `test` extra (or an extra the importing file names: torch, tfds). Read with `ast`, so
an import inside a function counts as what it is, wherever it sits."""

import ast
import functools
import importlib.metadata
import pathlib
import re
import sys
from unittest import mock

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = {"audiojepa", "configs", "launch", "tools", "tests"}
# Modules of this repository imported by tests and tools as top-level names (tests/*.py helpers, tools/*.py).
LOCAL_MODULES = ({p.stem for p in (ROOT / "tests").glob("*.py")} | {p.stem for p in (ROOT / "tools").glob("*.py")}
                 | {p.stem for p in (ROOT / "launch").glob("*.py")})
# Import names that no installed distribution maps back to (packages_distributions() misses namespace
# packages installed as part of another distribution).
IMPORT_TO_DISTRIBUTION = {"tensorboard_plugin_profile": "tensorboard-plugin-profile"}
BUILD_SYSTEM = {"setuptools"}  # setup.py itself runs on it; pip installs it with the build


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, {extra: requirements}) as normalised distribution names, from running setup.py with
    setuptools.setup captured."""
    with mock.patch.object(setuptools, "setup") as setup:
        exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    kwargs = setup.call_args.kwargs

    def names(requirements):
        return {normalise(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}
    return names(kwargs["install_requires"]), {k: names(v) for k, v in kwargs.get("extras_require", {}).items()}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(top-level module name, at module level?) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node, top_level):
        for child in ast.iter_child_nodes(node):
            nested = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import):
                out.extend((alias.name.split(".")[0], top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module.split(".")[0], top_level))
            visit(child, nested)
    visit(tree, True)
    return out


@functools.cache
def installed_packages() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    if module in IMPORT_TO_DISTRIBUTION:
        return {IMPORT_TO_DISTRIBUTION[module]}
    return {normalise(d) for d in installed_packages().get(module, [])}


def third_party(module: str) -> bool:
    return not ({module} & (sys.stdlib_module_names | FIRST_PARTY | LOCAL_MODULES | BUILD_SYSTEM))


def undeclared(files, allowed_at_top: set[str], allowed_lazily: set[str]) -> list[str]:
    problems = []  # one line per (file, module, where)
    for path in files:
        for module, top_level in imports(path):
            if not third_party(module):
                continue
            dists = distributions_of(module)
            allowed = allowed_at_top if top_level else allowed_lazily
            if not dists:
                problems.append(f"{path.relative_to(ROOT)}: imports {module!r}, which no installed distribution "
                                f"provides (install it and declare it in setup.py)")
            elif not dists & allowed:
                where = "at module level" if top_level else "inside a function"
                problems.append(f"{path.relative_to(ROOT)}: imports {module!r} ({', '.join(sorted(dists))}) {where}, "
                                "not declared for it in setup.py")
    return list(dict.fromkeys(problems))


def test_the_package_imports_only_what_setup_py_declares():
    required, extras = declared()
    every_extra = set().union(*extras.values()) if extras else set()
    problems = undeclared(sorted((ROOT / "audiojepa").rglob("*.py")), required, required | every_extra)
    assert not problems, "\n".join(problems)


def test_tests_and_tools_import_only_declared_distributions():
    required, extras = declared()
    for_tests = required | extras.get("test", set())
    optional = for_tests | extras.get("torch", set()) | extras.get("tfds", set())
    files = sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "tools").glob("*.py"), *(ROOT / "launch").glob("*.py"),
                    *(ROOT / "configs").glob("*.py")])
    problems = undeclared(files, for_tests, optional)
    assert not problems, "\n".join(problems)


def test_what_only_tests_need_is_not_a_runtime_requirement():
    """librosa and scikit-learn are references for tests (and one benchmark), not something every TPU worker needs."""
    required, extras = declared()
    assert not {"librosa", "scikit-learn", "pytest"} & required
    assert {"librosa", "scikit-learn", "pytest"} <= extras["test"]


def test_the_checker_sees_imports_where_they_are(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import numpy as np\nfrom jax import numpy\n\ndef f():\n    import torch\n    from a.b import c\n"
                      "class K:\n    import scipy\nfrom . import local\n")
    assert imports(source) == [("numpy", True), ("jax", True), ("torch", False), ("a", False), ("scipy", False)]
