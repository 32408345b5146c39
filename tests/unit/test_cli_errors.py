"""User mistakes told in one line: an interrupted command, an unknown override, an empty split."""

from __future__ import annotations

import pytest

from speech_kd import cli
from tests.conftest import REPO


def test_interrupt_says_how_to_resume(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.delenv("SPEECH_KD_TRACEBACK", raising=False)
    assert cli.run(["train", "hparams/student.yaml"]) == 130
    assert "speech-kd train: interrupted (run the same command again to resume)" in capsys.readouterr().err
    assert cli.run(["evaluate"]) == 130
    assert capsys.readouterr().err.strip() == "speech-kd evaluate: interrupted"


def test_bad_audio_met_in_training_says_how_to_go_on(monkeypatch, capsys, tmp_path):
    from speech_kd.data.audio import read_audio

    broken = tmp_path / "utt1.flac"
    broken.write_bytes(b"fLaC" + bytes(200))  # a FLAC signature and nothing decodable

    def reads_broken_audio(argv):
        read_audio(broken)

    monkeypatch.setattr(cli, "main", reads_broken_audio)
    monkeypatch.delenv("SPEECH_KD_TRACEBACK", raising=False)
    assert cli.run(["train", "hparams/student.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"speech-kd train: error: AudioError: {broken}: unreadable audio" in err
    assert f"fix or re-encode {broken}, or delete its row from the manifest" in err
    assert "resumes from its last checkpoint" in err
    assert cli.run(["evaluate"]) == 2
    assert "resumes" not in capsys.readouterr().err  # evaluate keeps no checkpoint


def test_unknown_override_and_broken_yaml_name_the_file():
    from speech_kd.training.settings import load_hparams

    path = REPO / "hparams/student.yaml"
    text = path.read_text()
    with pytest.raises(ValueError, match=r"student.yaml: --nope=\.\.\. overrides a key this yaml does not have"):
        load_hparams(str(path), text, {"data_folder": "d", "nope": 1})
    with pytest.raises(ValueError, match="not valid YAML"):
        load_hparams(str(path), text, "data_folder: d\nlr: [1")
    with pytest.raises(ValueError, match=r"^--lr is given twice on the command line \(overrides of .*student.yaml\)$"):
        load_hparams(str(path), text, "data_folder: d\nlr: 1\nlr: 2")
    with pytest.raises(ValueError, match=r"student.yaml: the key seed appears twice$"):
        load_hparams(str(path), text + "\nseed: 5\n", "data_folder: d")


def test_bench_refuses_a_bad_student_override_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("SPEECH_KD_TRACEBACK", raising=False)
    monkeypatch.setattr("tempfile.mkdtemp", lambda **kw: pytest.fail("work started before --extra was checked"))
    assert cli.run(["bench", "--extra=cnn_channels_1=8"]) == 2
    err = capsys.readouterr().err
    assert "speech-kd bench: error: ValueError: --extra: 'cnn_channels_1=8' is not --key=value" in err
    assert cli.run(["bench", "--extra=--cnn_chanels_1=8"]) == 2
    assert "--extra: ['cnn_chanels_1'] not keys of hparams/distill.yaml" in capsys.readouterr().err


def test_an_empty_split_is_an_error_naming_its_csv(tmp_path):
    from speech_kd.data.dataio import TranscriptError, load_dataset, make_tokenizer
    from speech_kd.data.prepare import CSV_HEADER

    csv = tmp_path / "train.csv"
    csv.write_text(",".join(CSV_HEADER) + "\n")
    with pytest.raises(TranscriptError, match=f"{csv}: no utterances"):
        load_dataset(csv, make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def test_a_manifest_that_is_not_utf8_is_named(tmp_path):
    from speech_kd.scoring.evaluate import read_manifest

    csv = tmp_path / "test.csv"
    csv.write_bytes("ID,duration,wav,spk_id,wrd\na,1.0,x.flac,1,CAF\u00c9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{csv}: not UTF-8 text"):
        read_manifest(csv)


def test_reading_a_missing_audio_file_says_so(tmp_path):
    from speech_kd.data.audio import AudioError, read_audio

    with pytest.raises(AudioError, match="nothere.flac: file does not exist"):
        read_audio(tmp_path / "nothere.flac")


def test_export_of_a_folder_that_does_not_exist_says_so(capsys, tmp_path):
    missing = tmp_path / "no_run" / "model"
    assert cli.run(["export", str(missing), "--out", str(tmp_path / "onnx")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{missing}: no such folder" in err[0]
    assert not (tmp_path / "onnx").exists()  # nothing written before the input is known to be good
