"""Evaluation: jiwer-exact metrics, the CLI contract, JSON keys and per-utterance output."""

from __future__ import annotations

import json

import jiwer
import pytest

from speech_kd.cli import main
from speech_kd.scoring.metrics import error_rates, utterance_errors


def test_error_rates_match_jiwer_on_known_texts():
    refs = ["THE CAT SAT ON THE MAT", "A QUICK BROWN FOX", "HELLO"]
    hyps = ["THE CAT SAT ON MAT", "A QUICK BROWN BOX JUMPS", "HELLO"]
    rates = error_rates(refs, hyps)
    assert rates.wer == pytest.approx(100 * jiwer.wer(refs, hyps))
    assert rates.cer == pytest.approx(100 * jiwer.cer(refs, hyps))
    assert (rates.substitutions, rates.deletions, rates.insertions) == (1, 1, 1)
    assert rates.num_utts == 3


def test_error_rates_normalise_case_and_spaces():
    assert error_rates(["hello  world"], ["HELLO WORLD "]).wer == 0.0


def test_utterance_errors_worst_first_with_alignment():
    per = utterance_errors(["a", "b"], ["ONE TWO", "THREE FOUR"], ["ONE TWO", "THREE FIVE SIX"])
    assert [u.utt_id for u in per] == ["b", "a"]
    assert per[0].errors == 2 and "REF" in per[0].alignment and "HYP" in per[0].alignment


def test_evaluate_cli_on_csv_and_on_librispeech_folder(trained_run, tiny_corpus, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--asr",
                str(trained_run / "model"),
                "--csv",
                str(trained_run / "data" / "test.csv"),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    summary = json.loads(out_json.read_text())
    assert {"wer", "cer", "num_utts", "params", "rtf"} <= set(summary)
    assert summary["num_utts"] == len((trained_run / "data" / "test.csv").read_text().strip().splitlines()) - 1
    assert summary["params"] > 1000 and summary["rtf"] > 0
    utts = (tmp_path / "eval_utts.txt").read_text()
    assert utts.count("REF:") == summary["num_utts"]
    printed = capsys.readouterr().out
    assert "WER" in printed and "RTF" in printed

    out2 = tmp_path / "res.v1" / "eval2.json"  # a dot in a folder name: the utterance file still goes beside it
    main(
        [
            "evaluate",
            "--asr",
            str(trained_run / "model"),
            "--data_folder",
            str(tiny_corpus),
            "--split",
            "test",
            "--json",
            str(out2),
        ]
    )
    assert json.loads(out2.read_text())["wer"] == summary["wer"]
    assert (tmp_path / "res.v1" / "eval2_utts.txt").exists()


def test_script_tells_a_missing_manifest_in_one_line(trained_run, tmp_path):
    """The ``speech-kd`` script: a user's missing file is one line naming it and exit status 2, no traceback."""
    import os
    import subprocess
    import sys

    missing = tmp_path / "dev.csv"
    model = str(trained_run / "model")
    cmd = [sys.executable, "-m", "speech_kd.cli", "evaluate", "--asr", model, "--csv", str(missing)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    expected = f"speech-kd evaluate: error: FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SPEECH_KD_TRACEBACK": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_evaluate_scores_an_ensemble_of_folders(trained_run, tmp_path):
    """``--asr A,B``: the ensemble's greedy transcripts; a model averaged with itself reads as the model alone."""
    from speech_kd.scoring.metrics import read_utterance_errors

    model, csv = str(trained_run / "model"), str(trained_run / "data" / "test.csv")
    main(["evaluate", "--asr", model, "--csv", csv, "--json", str(tmp_path / "one.json")])
    main(["evaluate", "--asr", f"{model},{model}", "--csv", csv, "--json", str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["params"] == 2 * one["params"]
    assert (two["wer"], two["cer"], two["num_utts"]) == (one["wer"], one["cer"], one["num_utts"])
    assert read_utterance_errors(tmp_path / "two_utts.txt") == read_utterance_errors(tmp_path / "one_utts.txt")


def test_ensemble_asr_decodes_as_encoder_asr_does(tmp_path):
    """Greedy decoding of the averaged posteriors equals SpeechBrain's own on a random model (non-empty text)."""
    import torch

    from speech_kd.model_folder import load_asr
    from speech_kd.scoring.evaluate import EnsembleASR
    from speech_kd.testing import make_tiny_sb_model, whitenoise

    folder = make_tiny_sb_model(tmp_path / "model", seed=3)
    wavs = torch.stack([whitenoise(1.5, seed=1), torch.cat([whitenoise(1.0, seed=2), torch.zeros(8000)])])
    lens = torch.tensor([1.0, 2 / 3])
    expected, _ = load_asr(folder).transcribe_batch(wavs, lens)
    words, _ = EnsembleASR([folder, folder]).transcribe_batch(wavs, lens)
    assert all(text.strip() for text in expected)
    assert words == [" ".join(text.split()) for text in expected]


def test_an_ensemble_member_that_does_not_exist_is_named(trained_run, tmp_path):
    from speech_kd.scoring.evaluate import evaluate_model
    from speech_kd.targets.teachers.base import TeacherError

    missing = tmp_path / "no_such_model"
    with pytest.raises(TeacherError, match=f"{missing} does not exist"):
        evaluate_model(f"{trained_run / 'model'},{missing}", trained_run / "data" / "test.csv", progress=False)


def test_evaluate_scores_a_hugging_face_folder_as_distillation_reads_it(trained_run, tmp_path):
    """``--asr HF_FOLDER`` (no hyperparams.yaml) goes through the teacher loader, as in an ensemble."""
    from speech_kd.testing import make_tiny_hf_ctc

    hf = make_tiny_hf_ctc(tmp_path / "w2v")
    csv = str(trained_run / "data" / "test.csv")
    assert main(["evaluate", "--asr", hf, "--csv", csv, "--json", str(tmp_path / "hf.json")]) == 0
    assert main(["evaluate", "--asr", f"{hf},{hf}", "--csv", csv, "--json", str(tmp_path / "hf2.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("hf", "hf2"))
    assert one["num_utts"] > 0 and one["params"] > 0 and two["params"] == 2 * one["params"]
    assert (one["wer"], one["cer"]) == (two["wer"], two["cer"])


def test_a_damaged_model_folder_is_named_in_one_line(trained_run, tmp_path):
    import shutil

    from speech_kd.model_folder import ModelFolderError, load_asr

    broken = tmp_path / "model"
    shutil.copytree(trained_run / "model", broken)
    (broken / "model.ckpt").write_bytes((broken / "model.ckpt").read_bytes()[:100])
    with pytest.raises(ModelFolderError, match=f"{broken}: cannot load"):
        load_asr(broken)


def test_a_tokenizer_of_another_size_than_the_output_layer_is_named_in_one_line(trained_run, tmp_path):
    import shutil

    from speech_kd.model_folder import ModelFolderError, load_asr

    edited = tmp_path / "model"
    shutil.copytree(trained_run / "model", edited)
    lines = (edited / "tokenizer.ckpt").read_text().splitlines(keepends=True)
    last = lines.index("================\n") - 1  # the last token; after the rule come the encoder's settings
    (edited / "tokenizer.ckpt").write_text("".join(lines[:last] + lines[last + 1 :]))  # one token fewer
    with pytest.raises(ModelFolderError, match=f"{edited}: tokenizer.ckpt holds {last} tokens, but output_neurons"):
        load_asr(edited)
    assert load_asr(trained_run / "model").tokenizer is not None  # the folder as written loads


def test_evaluate_warns_about_what_it_scores_other_than_given(trained_run, tmp_path, caplog):
    import csv as csv_mod
    import logging

    from speech_kd.scoring.evaluate import evaluate_model

    with open(trained_run / "data" / "test.csv", newline="") as fh:
        rows = list(csv_mod.DictReader(fh))
    rows[0]["wrd"] += " 42 CAF\u00c9"
    edited = tmp_path / "test.csv"
    with open(edited, "w", newline="") as fh:
        writer = csv_mod.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with caplog.at_level(logging.WARNING, logger="speech_kd.scoring.evaluate"):
        evaluate_model(trained_run / "model", edited, progress=False)
    assert f"1 of {len(rows)} reference transcripts use characters the model cannot output (24\u00c9)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="speech_kd.scoring.evaluate"):
        evaluate_model(trained_run / "model", trained_run / "data" / "test.csv", progress=False)
    assert "cannot output" not in caplog.text and "resampled" not in caplog.text

    # one file at 8 kHz, one in stereo: scored (resampled, averaged), and said so
    import numpy as np
    import soundfile as sf

    data, rate = sf.read(rows[0]["wav"], dtype="float32")
    sf.write(tmp_path / "low.flac", data[::2], rate // 2)
    sf.write(tmp_path / "stereo.flac", np.stack([data, data], axis=1), rate)
    rows[0]["wav"], rows[1]["wav"] = str(tmp_path / "low.flac"), str(tmp_path / "stereo.flac")
    with open(edited, "w", newline="") as fh:
        writer = csv_mod.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="speech_kd.scoring.evaluate"):
        result = evaluate_model(trained_run / "model", edited, progress=False)
    assert result.summary["num_utts"] == len(rows)
    assert f"1 of {len(rows)} files are not at the model's 16000 Hz and are resampled" in caplog.text
    assert f"1 of {len(rows)} files have several channels" in caplog.text


def test_a_long_file_of_a_pytorch_model_is_read_in_chunks_like_the_whole(tmp_path, monkeypatch):
    """evaluate of a PyTorch model folder chunks a long file by default (bounded memory, as transcribe.py)
    and transcribes it as the whole file would be: the shipped teacher on 12 utterances put end to end."""
    import csv as csv_mod

    import numpy as np
    import soundfile as sf

    import speech_kd.scoring.evaluate as evaluate
    from speech_kd import hparams_files
    from speech_kd.data.synth.voices import make_speakers, render

    speaker = make_speakers(1, 0)[0]
    sentences = ["THE CAT SAT ON THE MAT", "A DOG RAN HOME IN THE RAIN", "SHE READ THE OLD LETTER AGAIN"] * 4
    pieces = []
    for i, text in enumerate(sentences):
        render(speaker, text, tmp_path / f"{i}.flac")
        pieces.append(sf.read(tmp_path / f"{i}.flac", dtype="float32")[0])
    audio = np.concatenate(pieces)
    sf.write(tmp_path / "long.flac", audio, 16000)
    manifest = tmp_path / "long.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv_mod.writer(fh)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writerow(["long", f"{len(audio) / 16000:.3f}", str(tmp_path / "long.flac"), "s", " ".join(sentences)])
    monkeypatch.setattr(evaluate, "LONG_SECONDS", 5.0)  # the 60 s rule in 20 s chunks, on a file of about 20 s
    monkeypatch.setattr(evaluate, "AUTO_CHUNK_SECONDS", 4.0)
    teacher = str(hparams_files.shipped_teacher())
    chunked = evaluate.evaluate_model(teacher, manifest, progress=False, utts_path=tmp_path / "chunked.txt")
    whole = evaluate.evaluate_model(teacher, manifest, progress=False, chunk_seconds=0, max_duration=0)
    assert chunked.summary["num_utts"] == whole.summary["num_utts"] == 1
    assert abs(chunked.summary["wer"] - whole.summary["wer"]) <= 10.0  # a word or two at chunk boundaries
    assert chunked.summary["wer"] < 90.0  # it transcribed the speech (nothing scores 100)
