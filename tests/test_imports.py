"""The package's import graph: layers import downwards only, with no cycles and no imports
hidden inside functions to dodge one."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import retina_tf

PACKAGE = Path(retina_tf.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, top_level: bool) -> set[str]:
    """retina_tf modules imported by ``tree``: at module level, or inside functions."""
    nodes = tree.body if top_level else [n for f in ast.walk(tree)
                                         if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                                         for n in ast.walk(f)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "retina_tf":  # from retina_tf import visualize
                found |= {f"retina_tf.{a.name}" for a in node.names}
            elif node.module.startswith("retina_tf."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("retina_tf.")}
    return found - {module}


def _graph(top_level: bool = True) -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        graph[module] = _imports(ast.parse(path.read_text()), module, top_level)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    graph.pop("retina_tf")  # the package imports its public API on top of everything
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if dep in graph:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_no_retina_tf_imports_hide_inside_functions():
    hidden = {m: deps for m, deps in _graph(top_level=False).items() if deps}
    assert hidden == {}


# Bottom to top; a module imports only from its own layer or below.
# Losses sit below the models: a model may own its training loss (Keras's compute_loss).
LAYERS = [
    ("retina_tf._startup", "retina_tf.errors", "retina_tf.config", "retina_tf.progress",
     "retina_tf.data", "retina_tf.visualize"),
    ("retina_tf.losses", "retina_tf.metrics", "retina_tf.optimizers", "retina_tf.postprocess",
     "retina_tf.error_maps"),
    ("retina_tf.models",),
    ("retina_tf.run_folder", "retina_tf.inference"),
    ("retina_tf.evaluation", "retina_tf.export"),
    ("retina_tf.training", "retina_tf.pretraining", "retina_tf.compare"),
    ("retina_tf.flags", "retina_tf.cli", "retina_tf.__main__"),
]


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_layers_import_downwards_only():
    graph = _graph()
    graph.pop("retina_tf")
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
              if d != "retina_tf" and _layer(d) > _layer(m)]
    assert not upward


def test_only_the_command_line_layer_uses_absl():
    users = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "absl" or n.startswith("absl.") for n in names):
                users.add(_module_name(path))
    assert users <= {"retina_tf.flags", "retina_tf.cli"}, users


@pytest.mark.slow
def test_each_module_imports_alone_in_a_fresh_process():
    # One interpreter imports the heavy third-party packages once, then forks a child per
    # module: each child starts with no retina_tf module loaded and imports just that one.
    code = """
import os, sys
import numpy, tensorflow, keras, cv2, skimage, scipy.ndimage, absl.flags  # shared
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
            os._exit(0)
        except BaseException as err:
            print(name, type(err).__name__, err, flush=True)
            os._exit(1)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("failed:", " ".join(failed))
"""
    names = sorted(m for m in _graph() if m != "retina_tf.__main__")  # __main__ runs a command
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].strip() == "failed:", proc.stdout[-2000:]


def test_only_python_m_retina_tf_is_a_command_not_a_package_that_imports_it(tmp_path):
    """`python -m svc`, whose __init__ imports retina_tf, set OPENBLAS_NUM_THREADS=1 and
    TF_CPP_MIN_LOG_LEVEL=3 for the user's whole service: '-m' alone was taken for retina_tf's."""
    startup = Path(retina_tf.__file__).with_name("_startup.py")
    probe = ("import importlib.util\n"
             f"spec = importlib.util.spec_from_file_location('s', {str(startup)!r})\n"
             "module = importlib.util.module_from_spec(spec)\n"
             "spec.loader.exec_module(module)\n"
             "print(module._is_command())\n")
    said = {}
    for package in ("svc", "retina_tf"):  # a fake retina_tf: its name is what counts
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(probe)
        (tmp_path / package / "__main__.py").write_text("")
        said[package] = subprocess.run([sys.executable, "-m", package], cwd=tmp_path,
                                       capture_output=True, text=True, check=True).stdout
    assert said == {"svc": "False\n", "retina_tf": "True\n"}
