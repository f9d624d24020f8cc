#!/usr/bin/env bash
# Build the documentation site into docs/_build/html with warnings as errors (a docstring that breaks the build
# fails here, and in tests/test_docs.py under CI). Installs the `docs` extra of pyproject.toml into the environment
# it runs in: .venv when there is one (scripts/setup.sh), else PYTHON or python3. Extra arguments go to sphinx-build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then V=$PYTHON; elif [ -x .venv/bin/python ]; then V=.venv/bin/python; else V=python3; fi
extra=$($V -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))')
$V -m pip install -q $extra
$V -m sphinx -E -W --keep-going -b html docs docs/_build/html "$@"  # -E: the tables are generated from the code
echo "docs: open docs/_build/html/index.html"
