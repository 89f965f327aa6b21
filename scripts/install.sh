#!/usr/bin/env bash
# Installs Pie and what it needs into the current Python environment.
#   bash scripts/install.sh         the simulator (pie-sim): no PyTorch
#   bash scripts/install.sh exec    the simulator and the executor (pie-exec): PyTorch, safetensors
#   bash scripts/install.sh test    the simulator, the executor and the test dependencies
# torch (exec, test): a torch that is already installed (e.g. a CUDA build on a GPU host) is kept; otherwise
# torch==2.13.0 is installed, which on Pie's CPU machines is a local CPU wheel (any other spec would pull
# gigabytes of CUDA packages from the registry).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
case "${1:-}" in
    "") ;;
    exec|test)
        if "$python" -c "import torch" 2>/dev/null; then
            echo "install: keeping torch $("$python" -c 'import torch; print(torch.__version__)')"
        else
            echo "install: torch==2.13.0"
            "$python" -m pip install --quiet "torch==2.13.0"
        fi ;;
    *) echo "install: unknown extra '$1' (known: exec, test)" >&2; exit 2 ;;
esac
extras=${1:+[$1]}
echo "install: pie${extras} (editable) and its dependencies"
"$python" -m pip install --quiet -e ".${extras}"
