#!/usr/bin/env bash
# Install everything speech_kd needs on a fresh Debian machine:
#   - Debian packages: TTS engines for the synthetic corpus, sox, and (with --test) chromium
#   - a virtualenv .venv with the known-good Python stack and speech_kd (editable)
#   - KenLM (lmplz, build_binary, the kenlm module) built from its PyPI sdist (scripts/install_kenlm.sh)
#   - with --test the test and export extras, with --docs the docs extra (Sphinx, pinned in requirements/docs.txt)
# Idempotent: a rerun only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
WITH_DOCS=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    --docs) WITH_DOCS=1 ;;
    *) echo "usage: $0 [--test] [--docs]" >&2; exit 2 ;;
  esac
done

apt_packages=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox libsox-fmt-all)
[[ $WITH_TEST == 1 ]] && apt_packages+=(chromium)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
extras="hf"
[[ $WITH_TEST == 1 ]] && extras="$extras,test,export"  # the export tests need onnx + onnxruntime
[[ $WITH_DOCS == 1 ]] && extras="$extras,docs"
stamp=".venv/.speech_kd_installed_${extras//,/_}"
if [[ ! -f $stamp || pyproject.toml -nt $stamp || requirements/known-good.txt -nt $stamp \
      || requirements/docs.txt -nt $stamp ]]; then
  echo "[setup] installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c requirements/known-good.txt -r requirements/known-good.txt
  .venv/bin/pip install -q -c requirements/known-good.txt -c requirements/docs.txt -e ".[${extras}]"
  touch "$stamp"
fi
bash scripts/install_kenlm.sh  # KenLM's lmplz/build_binary + the kenlm module (speech-kd lm, evaluate --lm); idempotent
echo "[setup] ready: $(.venv/bin/python -c 'import torch, speechbrain; print("torch", torch.__version__, "speechbrain", speechbrain.__version__)')"
