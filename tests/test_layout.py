"""The repository's layout rules: a package that stands alone, thin scripts around it.

* no file under tests/ imports a top-level script or benchmark, or another file of tests/ (``conftest`` is
  the one shared module: pytest loads it itself), loads files by path (only conftest.py may: it loads the
  reference network), or edits ``sys.path``;
* scripts and benchmarks import the package, not each other, and do not edit ``sys.path``;
* the package imports no script, benchmark or test;
* scripts and benchmarks define ``main(argv=None)`` and call it under ``if __name__ == "__main__"``;
* no file of the repository mentions the design document the rewrite started from;
* pyproject.toml declares requirements.txt's runtime ranges and ships every data file of the package.

Files that still break a rule are listed in ``ALLOWED``, one entry per violation, so a new violation (in
any file) fails here while the listed ones are being fixed.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PACKAGE = ROOT / "shifted_diffusion"
SCRIPTS = ("train", "finetune", "sft_test", "test", "process_img", "train_toy_decoder", "evaluate")
SCRIPT_FILES = [ROOT / f"{name}.py" for name in SCRIPTS]
BENCHMARK_FILES = sorted((ROOT / "benchmarks").glob("*.py"))
# test helper modules: every file of tests/ but conftest.py
TEST_MODULES = {path.stem for path in TESTS.glob("*.py")} - {"conftest"}
BY_PATH_LOADERS = {"load_repo_module", "spec_from_file_location", "SourceFileLoader", "exec_module", "run_path",
                   "run_module"}

# Known violations, one entry each, while a file is being fixed (none now: every rule holds).
ALLOWED: set = set()


def _rel(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


def _called_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of every absolute import in the tree (relative imports stay inside their package)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def edits_sys_path(tree: ast.AST) -> bool:
    """sys.path.insert / append / ..., sys.path = ..., sys.path[...] = ..., site.addsitedir(...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if _is_sys_path(node.func.value) or node.func.attr == "addsitedir":
                return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if _is_sys_path(target) or (isinstance(target, ast.Subscript) and _is_sys_path(target.value)):
                return True
    return False


def violations(path: Path, *, forbidden_imports: dict[str, str], by_path_allowed: bool = False,
               root: Path = ROOT) -> set[str]:
    """The rule violations of one Python file, as "<file>: <what>" lines. `forbidden_imports` maps a
    top-level module name to what it is ("the script", "the test module", ...)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for name in sorted(imported_modules(tree)):
        if name in forbidden_imports:
            found.add(f"{_rel(path, root)}: imports {forbidden_imports[name]} {name}")
    if edits_sys_path(tree):
        found.add(f"{_rel(path, root)}: edits sys.path")
    if not by_path_allowed:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node) in BY_PATH_LOADERS:
                found.add(f"{_rel(path, root)}: loads a file by path ({_called_name(node)})")
    return found


FORBIDDEN = {**{name: "the script" for name in SCRIPTS}, "benchmarks": "the benchmarks", "tests": "the tests",
             **{name: "the test module" for name in TEST_MODULES}}


def violations_in_tests() -> set[str]:
    """Files of tests/: conftest.py alone may load files by path (tests/reference_prior.py)."""
    found = set()
    for path in sorted(TESTS.glob("*.py")):
        found |= violations(path, forbidden_imports=FORBIDDEN, by_path_allowed=path.name == "conftest.py")
    return found


def violations_in_scripts() -> set[str]:
    """Scripts and benchmarks: prior_speed.py alone may load a file by path (tests/reference_prior.py)."""
    found = set()
    for path in [*SCRIPT_FILES, *BENCHMARK_FILES]:
        forbidden = {k: v for k, v in FORBIDDEN.items() if k != path.stem}  # a file may name its own module
        found |= violations(path, forbidden_imports=forbidden, by_path_allowed=path.name == "prior_speed.py")
    return found


def _check(found: set[str]) -> None:
    new = sorted(found - ALLOWED)
    assert not new, "layout rules broken:\n  " + "\n  ".join(new)


def test_tests_import_only_the_package():
    _check(violations_in_tests())


def test_scripts_and_benchmarks_import_only_the_package():
    _check(violations_in_scripts())


def test_the_package_imports_no_script_benchmark_or_test():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        found |= violations(path, forbidden_imports={**FORBIDDEN, "conftest": "the test module"},
                            by_path_allowed=True)
    _check(found)


def test_the_rule_checker_finds_each_kind_of_violation(tmp_path):
    """The checks above can fail: each kind of violation in a planted file is found."""
    planted = tmp_path / "test_planted.py"
    planted.write_text("import sys\nimport train\nfrom test_finetune import x\nfrom shifted_diffusion import data\n"
                       "sys.path.insert(0, '.')\nimport importlib.util as u\nu.spec_from_file_location('a', 'b')\n")
    found = violations(planted, forbidden_imports={"train": "the script", "test_finetune": "the test module"},
                       root=tmp_path)
    assert found == {"test_planted.py: imports the script train", "test_planted.py: imports the test module test_finetune",
                     "test_planted.py: edits sys.path", "test_planted.py: loads a file by path (spec_from_file_location)"}
    assert edits_sys_path(ast.parse("import sys\nsys.path[:0] = ['x']\n"))
    assert not edits_sys_path(ast.parse("import os\nenv = {'PYTHONPATH': '.'}\npath = os.path.join('a')\n"))


@pytest.mark.parametrize("path", [*SCRIPT_FILES, *BENCHMARK_FILES], ids=_rel)
def test_scripts_define_main_argv_none(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mains = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert len(mains) == 1, f"{_rel(path)}: no top-level main()"
    args = mains[0].args
    assert [a.arg for a in args.args][:1] == ["argv"] and len(args.args) == 1, f"{_rel(path)}: main(argv=None) expected"
    assert len(args.defaults) == 1 and isinstance(args.defaults[0], ast.Constant) and args.defaults[0].value is None
    guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert guards and "main(" in ast.unparse(guards[-1]), f"{_rel(path)}: no `if __name__ == \"__main__\": main()`"


SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "outputs", "runs", "toy_world", "build", "dist"}


def repository_files():
    """Every file of the checkout, but for version control, virtual environments, caches and run outputs."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")
                   and not (Path(folder) / d / "pyvenv.cfg").exists()]
        for name in files:
            if name != ".git":  # a worktree's pointer to its repository
                yield Path(folder) / name


def test_no_file_mentions_the_design_document():
    needle = ("design" + ".md").encode()  # spelled apart: this file must not match itself
    mentions = []
    for path in repository_files():
        if path.stat().st_size <= 4 * 2**20 and needle in path.read_bytes().lower():
            mentions.append(_rel(path))
    assert not mentions, f"files that mention the design document: {mentions}"


# ---------------------------------------------------------------------------------------------- packaging

def _pyproject() -> dict:
    toml = pytest.importorskip("tomllib")  # Python >= 3.11
    return toml.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_lines() -> list[str]:
    lines = []
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(re.sub(r"\s+", "", line))
    return lines


def test_pyproject_declares_the_requirements():
    project = _pyproject()["project"]
    declared = [re.sub(r"\s+", "", d) for d in project["dependencies"]]
    test_extra = [re.sub(r"\s+", "", d) for d in project["optional-dependencies"]["test"]]
    assert sorted(declared + test_extra) == sorted(_requirement_lines())
    assert len(set(declared)) == len(declared) and any(d.startswith("torch>=") for d in declared)
    assert "-e ." in (ROOT / "requirements.txt").read_text()  # the README's install line installs the package


def test_every_data_file_of_the_package_is_shipped():
    from fnmatch import fnmatch

    package_data = _pyproject()["tool"]["setuptools"].get("package-data", {})
    data_files = [path for path in PACKAGE.rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")
                  and "__pycache__" not in path.parts]
    assert data_files, "the package ships the toy preset at least"
    missing = []
    for path in data_files:
        package = ".".join(path.parent.relative_to(ROOT).parts)
        if not any(fnmatch(path.name, pattern) for pattern in package_data.get(package, [])):
            missing.append(_rel(path))
    assert not missing, f"package files pip install would leave out (add them to package-data): {missing}"


def test_allow_list_entries_still_apply():
    """Not a failure when someone fixes a listed file: a reminder to shorten ALLOWED."""
    stale = sorted(ALLOWED - violations_in_tests() - violations_in_scripts())
    if stale:
        warnings.warn("fixed, remove from tests/test_layout.py's ALLOWED: " + "; ".join(stale))
