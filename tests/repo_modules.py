"""The repository's scripts and benchmarks as modules, loaded by path: they are not a package, and the
repo's test.py shares its name with the standard library's `test`."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_repo_module(relative_path: str):
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"_repo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
