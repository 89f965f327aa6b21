#!/usr/bin/env bash
# Installs Pie and everything it needs into the current Python environment.
#   bash scripts/install.sh         runtime dependencies
#   bash scripts/install.sh test    runtime + test dependencies
# torch: a torch that is already installed (e.g. a CUDA build on a GPU host) is kept; otherwise
# torch==2.13.0 is installed, which on Pie's CPU machines is a local CPU wheel (any other spec
# would pull gigabytes of CUDA packages from the registry).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${1:+[$1]}

if "$python" -c "import torch" 2>/dev/null; then
    echo "install: keeping torch $("$python" -c 'import torch; print(torch.__version__)')"
else
    echo "install: torch==2.13.0"
    "$python" -m pip install --quiet "torch==2.13.0"
fi
echo "install: pie${extras} (editable) and its dependencies"
"$python" -m pip install --quiet -e ".${extras}"
