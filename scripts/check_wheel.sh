#!/usr/bin/env bash
# The wheel as users get it: built from this checkout, installed (not editable) into a fresh virtualenv
# outside the checkout, and run in an empty folder: the packaged yamls, a 1-epoch tiny train and distill
# without a yaml argument (a yaml given as a path: the rest of the suite), evaluate, export and a
# 1-repeat bench (about 3 minutes on 2 cores).
# Dependencies come from the checkout's .venv (a plain .pth path line: it does not run an editable finder,
# so the installed wheel, not the checkout, is what runs).
# Usage: scripts/check_wheel.sh [PYTHON_WITH_THE_DEPENDENCIES]   (default: .venv/bin/python)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
deps_python="${1:-$repo/.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

rm -rf "$repo/build"  # a stale build/lib would put removed modules into the wheel
"$deps_python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheel" "$repo"
site="$("$deps_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python3 -m venv "$work/venv"
venv_site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site" > "$venv_site/deps.pth"
"$work/venv/bin/pip" install -q --no-deps --no-index "$work"/wheel/*.whl

mkdir "$work/empty" && cd "$work/empty"
export PATH="$work/venv/bin:$PATH" OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=
installed="$(python -c 'import speech_kd; print(speech_kd.__file__)')"
[[ $installed == "$work/venv/"* ]] || { echo "check_wheel: speech_kd imported from $installed, not the wheel" >&2; exit 1; }

tiny=(--d_model=32 --d_ffn=64 --num_encoder_layers=1 --cnn_channels_1=8 --cnn_channels_2=4 --max_batch_length=40
      --warmup_steps=5 --number_of_epochs=1)
set -x
speech-kd hparams
speech-kd hparams distill.yaml --out my_distill.yaml
! speech-kd hparams distill.yaml --out my_distill.yaml 2>/dev/null  # never overwritten
speech-kd demo --help >/dev/null
speech-kd synth corpus --hours 0.025 --speakers 4 --dev_hours 0.006 --dev_speakers 2 --test_hours 0.006 \
  --test_speakers 2 --seed 7 --jobs 2 >/dev/null
speech-kd train --data_folder=corpus --output_folder=teacher "${tiny[@]}"
speech-kd distill --data_folder=corpus --output_folder=student --teacher_source=teacher/model "${tiny[@]}" \
  --report_after_run=False
speech-kd evaluate --asr student/model --csv student/data/test.csv --json student/eval.json
# the documents' name of the shipped teacher works outside a checkout (the package's copy)
speech-kd evaluate --asr speech_kd/pretrained/teacher_synth --csv student/data/test.csv
speech-kd cache-targets --teacher speech_kd/pretrained/teacher_synth --csv student/data/test.csv --out shipped_cache
speech-kd export student/model --out student_onnx
speech-kd evaluate --asr student_onnx --csv student/data/test.csv
speech-kd bench --repeats 1 --batch_size 2 --json bench.json >/dev/null
set +x
echo "check_wheel: the wheel works outside the checkout"
