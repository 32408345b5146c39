#!/usr/bin/env bash
# Install KenLM for speech_kd's language models (speech_kd/lm.py, speech_kd/decoding.py):
#   - lmplz and build_binary (KenLM's estimator and binariser) into $VENV/bin, built with cmake from the
#     C++ sources inside the `kenlm` package's sdist on PyPI (no Debian package of KenLM exists in bookworm)
#   - the `kenlm` Python module into $VENV (pip builds the same sdist), and pygtrie, which SpeechBrain's
#     KenLM scorer (speechbrain.integrations.decoders.kenlm_scorer) imports
# Debian packages it needs: a C++ toolchain, cmake, Boost (program_options system thread test) and the
# compression libraries KenLM reads ARPA files with (zlib, bzip2, xz).
# Idempotent: a rerun with everything in place only checks. Measured on 2 cores: about 1 min for the two
# binaries, 1.5 min for the Python module (apt packages excluded).
# Environment: VENV (default .venv of the repository), KENLM_VERSION (default 0.3.0), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
KENLM_VERSION=${KENLM_VERSION:-0.3.0}
PYGTRIE_VERSION=${PYGTRIE_VERSION:-2.6.2}
JOBS=${JOBS:-$(nproc)}
[[ -x $VENV/bin/python ]] || { echo "[kenlm] no virtualenv at $VENV: run scripts/setup.sh first (or set VENV)" >&2; exit 1; }

have_binaries() { [[ -x $VENV/bin/lmplz && -x $VENV/bin/build_binary ]]; }
have_module() { "$VENV/bin/python" -c "import kenlm, pygtrie" >/dev/null 2>&1; }
if have_binaries && have_module; then
  echo "[kenlm] ready: $VENV/bin/lmplz, $VENV/bin/build_binary, kenlm $("$VENV/bin/pip" show kenlm 2>/dev/null | sed -n 's/^Version: //p')"
  exit 0
fi

apt_packages=(build-essential cmake libboost-program-options-dev libboost-system-dev libboost-thread-dev
              libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  echo "[kenlm] installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

src_dir="$VENV/src/kenlm"
sdist="$src_dir/kenlm-$KENLM_VERSION.tar.gz"
mkdir -p "$src_dir"
if [[ ! -f $sdist ]]; then
  echo "[kenlm] downloading the kenlm $KENLM_VERSION sdist"
  # --no-binary kenlm only (not :all:): the sdist's build requirements (cmake, setuptools) stay wheels
  "$VENV/bin/pip" download -q --no-deps --no-binary kenlm "kenlm==$KENLM_VERSION" -d "$src_dir"
fi

if ! have_binaries; then
  echo "[kenlm] building lmplz and build_binary ($JOBS jobs)"
  tree="$src_dir/kenlm-$KENLM_VERSION"
  rm -rf "$tree"
  tar -xzf "$sdist" -C "$src_dir"
  cmake -S "$tree" -B "$tree/build" -DCMAKE_BUILD_TYPE=Release -DKENLM_MAX_ORDER=6 >"$src_dir/cmake.log" 2>&1 \
    || { tail -20 "$src_dir/cmake.log" >&2; exit 1; }
  make -C "$tree/build" -j "$JOBS" lmplz build_binary >"$src_dir/make.log" 2>&1 \
    || { tail -20 "$src_dir/make.log" >&2; exit 1; }
  install -m 755 "$tree/build/bin/lmplz" "$tree/build/bin/build_binary" "$VENV/bin/"
  rm -rf "$tree"
fi

if ! have_module; then
  echo "[kenlm] installing the kenlm Python module and pygtrie"
  "$VENV/bin/python" -c "import kenlm" >/dev/null 2>&1 || MAX_ORDER=6 "$VENV/bin/pip" install -q "$sdist"
  "$VENV/bin/pip" install -q "pygtrie==$PYGTRIE_VERSION"
fi
have_binaries && have_module
echo "[kenlm] ready: $VENV/bin/lmplz, $VENV/bin/build_binary, kenlm $KENLM_VERSION"
