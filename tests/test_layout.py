"""Project-wide rules: the README's test command is CI's; each package imports only the layers below it, and
the policy package stays free of torch, simpy, files and command lines."""
import ast
import subprocess
import sys

import pytest

from .conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    commands = [line for line in readme.splitlines() if line.startswith("bash scripts/install.sh")]
    assert len(commands) == 2, commands
    assert ci == commands[1]


# The layers (docs/DESIGN.md): data and decisions at the bottom, the serving loop above them, the two backends
# above that and validation on top; a package never imports one above it or beside it.
BACKENDS = ("pie_sim", "pie_exec", "pie_validate")
FORBIDDEN = {
    "hwmodels": ("torch", "simpy", "pie_policy", "pie_serving", *BACKENDS),
    "traces": ("torch", "simpy", "pie_policy", "pie_serving", *BACKENDS),
    "pie_policy": ("torch", "simpy", "argparse", "pie_serving", *BACKENDS),
    "pie_serving": ("torch", "simpy", *BACKENDS),
    "pie_sim": ("torch", "pie_exec", "pie_validate"),
    "pie_exec": ("simpy", "pie_sim", "pie_validate"),
}


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_packages_import_nothing_above_or_beside_them(package):
    """Every module of the package, in a fresh interpreter so that nothing else imported them first."""
    code = (f"import importlib, pkgutil, sys, {package}\n"
            f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            f"print(sorted(m for m in {FORBIDDEN[package]!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


FILE_IO_MODULES = {"pathlib", "os", "io", "json", "csv", "pickle", "shutil", "tempfile", "argparse"}


def test_the_policy_package_reads_and_writes_no_files():
    """Decisions only: no module of pie_policy imports a file or command-line module or calls open()."""
    for path in sorted((REPO / "pie_policy").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & FILE_IO_MODULES, f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in FILE_IO_MODULES, f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", f"{path.name}:{node.lineno}"


def test_the_python_required_has_every_standard_module_the_code_imports():
    """tomllib (reading every catalog and grid) is new in Python 3.11: an install on 3.10 must be refused
    by pip, not succeed and then fail at the first command."""
    import tomllib

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    uses = [path for package in FORBIDDEN for path in (REPO / package).glob("*.py") if "tomllib" in path.read_text()]
    assert uses, "no module reads TOML any more: requires-python may go back to >=3.10"
