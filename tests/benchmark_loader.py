"""Loading a script of ``benchmarks/`` as a module, for tests of its parts."""

import importlib.util
import sys
from pathlib import Path


def load_benchmark(name: str):
    folder = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # benchmarks import each other
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module
