"""Project-wide rules: the README's test command is CI's; the policy core stays free of torch and simpy."""
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


@pytest.mark.parametrize("package", ["pie_policy", "hwmodels", "traces"])
def test_shared_packages_import_neither_torch_nor_simpy(package):
    """Every module of the package, in a fresh interpreter so that nothing else imported them first."""
    code = (f"import importlib, pkgutil, sys, {package}\n"
            f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'): importlib.import_module(m.name)\n"
            "print(sorted(m for m in ('torch', 'simpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
