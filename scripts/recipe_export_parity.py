#!/usr/bin/env python3
"""How close the exports of a recipe's output folder are to the recipe's own modules, on real audio.

Exports the folder four ways (ONNX and TorchScript, fp32 and int8) into ``--out`` and, for each, prints the
largest log-probability difference of the exported folder (``transcribe.py``'s numpy fbank and network,
utterance by utterance) from the recipe's modules on SpeechBrain's ``Fbank``, and how many greedy
transcripts agree (docs/deploy.md, "Exporting a student trained in your own recipe")::

    python scripts/recipe_export_parity.py RECIPE_OUTPUT_FOLDER AUDIO ... --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from speech_kd.deploy.onnx_export import export_recipe
from speech_kd.deploy.recipe_folder import RecipeCTC, load_recipe
from speech_kd.deploy.runtime import ExportedASR, greedy_decode

VARIANTS = {
    "onnx_fp32": {},
    "torchscript_fp32": {"fmt": "torchscript"},
    "onnx_int8": {"quantize": "int8"},
    "torchscript_int8": {"fmt": "torchscript", "quantize": "int8"},
}


def main() -> None:
    """Export the folder the four ways and print one JSON line of measurements per export."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the recipe's output folder")
    parser.add_argument("audio", nargs="+", help="audio files at the model's sample rate")
    parser.add_argument("--out", required=True, help="folder for the four exports (DIR/onnx_fp32, ...)")
    args = parser.parse_args()
    model = load_recipe(args.folder)
    reference = RecipeCTC(model.steps, single=False)
    wavs = [sf.read(path, dtype="float32")[0] for path in args.audio]
    expected = []
    for wav in wavs:
        with torch.no_grad():
            feats = model.features(torch.from_numpy(wav)[None])
            expected.append(reference(feats, torch.tensor([feats.shape[1]]))[0][0].numpy())
    rows = {}
    for name, options in VARIANTS.items():
        info = export_recipe(args.folder, Path(args.out) / name, force=True, **options)
        asr = ExportedASR(Path(args.out) / name, threads=1)
        got = [asr.log_probs([wav])[0] for wav in wavs]
        rows[name] = {
            "path": info["path"],
            "max_abs_diff": max(float(np.abs(g - e).max()) for g, e in zip(got, expected)),
            "same_greedy": sum(
                asr.decode(g) == asr.text(greedy_decode(e, model.blank_index)) for g, e in zip(got, expected)
            ),
            "utterances": len(wavs),
        }
        print(json.dumps({name: rows[name]}))


if __name__ == "__main__":
    main()
