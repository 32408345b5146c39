"""Real CTC training: loss goes down, model folders load in SpeechBrain, runs resume."""

from __future__ import annotations

import json
import re

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speech_kd.data.dataio import TranscriptError, load_dataset, make_tokenizer
from speech_kd.data.prepare import prepare_librispeech
from speech_kd.training.ctc_brain import CTCBrain
from speech_kd.training.train import run_training
from tests.conftest import REPO, TINY_MODEL


def _overrides(args: list[str]) -> dict:
    return {a[2:].split("=", 1)[0]: yaml_value(a.split("=", 1)[1]) for a in args}


def yaml_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def test_training_steps_lower_the_loss(tiny_corpus, tmp_path, device):
    hparams = load_hyperpyyaml(
        (REPO / "hparams/teacher.yaml").read_text(),
        {
            "data_folder": str(tiny_corpus),
            "output_folder": str(tmp_path),
            **_overrides(TINY_MODEL),
            "spec_augment": False,
            "speed_perturb": False,
            "dropout": 0.0,
        },
    )
    csv = prepare_librispeech(tiny_corpus, tmp_path, splits=["train"]).csv_files["train"]
    tokenizer = make_tokenizer(hparams["alphabet"])
    data = load_dataset(csv, tokenizer, sorting="ascending")
    loader = sb.dataio.dataloader.make_dataloader(data, batch_size=4)
    batch = next(iter(loader))
    brain = CTCBrain(
        modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams, run_opts={"device": device}
    )
    brain.tokenizer = tokenizer
    brain.on_fit_start()
    brain.hparams.lr_scheduler.set_total_steps(1000)
    losses = [float(brain.fit_batch(batch)) for _ in range(25)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < 0.7 * losses[0], losses


def test_model_folder_loads_in_speechbrain(trained_run, tiny_corpus):
    from speechbrain.inference.ASR import EncoderASR
    from speechbrain.utils.fetching import FetchConfig

    folder = trained_run / "model"
    assert {"hyperparams.yaml", "model.ckpt", "normalizer.ckpt", "tokenizer.ckpt"} <= {p.name for p in folder.iterdir()}
    model_yaml = (folder / "hyperparams.yaml").read_text()
    assert ":speech_kd." not in model_yaml  # loadable with SpeechBrain alone
    asr = EncoderASR.from_hparams(
        source=str(folder), savedir=str(trained_run / "load"), fetch_config=FetchConfig(allow_network=False)
    )
    flac = sorted((tiny_corpus / "test").glob("*/*/*.flac"))[0]
    assert isinstance(asr.transcribe_file(str(flac)), str)
    wavs = torch.randn(2, 32000) * 0.05
    out = asr.encode_batch(wavs, torch.tensor([1.0, 0.6]))
    assert out.shape[0] == 2 and out.shape[2] == 29
    assert torch.allclose(out.exp().sum(-1), torch.ones(out.shape[:2]), atol=1e-4)
    info = json.loads((folder / "speech_kd.json").read_text())
    assert info["tokens"][0] == "<blank>" and len(info["tokens"]) == 29


def test_exported_model_matches_training_forward(trained_run):
    """The exported encoder and the Brain's chain give the same log-probs."""
    from speech_kd.model_folder import load_asr
    from speech_kd.training.ctc_brain import run_chain

    asr = load_asr(trained_run / "model", savedir=str(trained_run / "load2"))
    hparams = load_hyperpyyaml((trained_run / "hyperparams.yaml").read_text())
    state = torch.load(trained_run / "model" / "model.ckpt")
    hparams["model"].load_state_dict(state)
    hparams["normalize"]._load(str(trained_run / "model" / "normalizer.ckpt"))
    for module in hparams["modules"].values():
        module.eval()
    wavs, lens = torch.randn(3, 24000) * 0.05, torch.tensor([1.0, 0.8, 0.5])
    with torch.no_grad():
        ours = run_chain(
            {**hparams["modules"], "log_softmax": hparams["log_softmax"]}, hparams["encoder_chain"], wavs, lens
        )
        theirs = asr.encode_batch(wavs, lens)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_training_writes_results_and_resumes(trained_run, tiny_corpus):
    log = (trained_run / "train_log.txt").read_text()
    assert re.findall(r"epoch: (\d+)", log) == ["1", "2"]
    results = json.loads((trained_run / "test_results.json").read_text())
    assert {"WER", "CER", "loss"} <= set(results["test"])
    # a rerun with more epochs resumes from the last checkpoint: only epoch 3 is trained
    run_training(
        [
            str(REPO / "hparams/teacher.yaml"),
            f"--data_folder={tiny_corpus}",
            f"--output_folder={trained_run}",
            "--number_of_epochs=3",
            *TINY_MODEL,
        ]
    )
    log = (trained_run / "train_log.txt").read_text()
    assert re.findall(r"epoch: (\d+)", log) == ["1", "2", "3"]


def test_transcripts_with_unknown_characters_name_the_utterance(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("ID,duration,wav,spk_id,wrd\nu1,2.0,/x.flac,1,HELLO\nu2,2.0,/y.flac,1,H3LLO\n")
    with pytest.raises(TranscriptError, match=r"u2: '3'"):
        load_dataset(csv, make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def test_utterances_too_short_for_their_labels_are_skipped(tmp_path, caplog):
    csv = tmp_path / "short.csv"
    csv.write_text("ID,duration,wav,spk_id,wrd\nok,3.0,/x.flac,1,HELLO\nshort,0.1,/y.flac,1,HELLO THERE\n")
    data = load_dataset(csv, make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"), frame_shift=0.04)
    assert len(data) == 1
    assert "short" in caplog.text and "too short" in caplog.text


def _damage_middle(path) -> None:
    """Overwrite 4 kB in the middle of a FLAC: its header and both ends still decode, its middle does not."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid - 2000 : mid + 2000] = (
        torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes()
    )
    path.write_bytes(bytes(data))


def test_audio_damaged_inside_is_left_out_of_training_with_a_warning(corpus_copy, tmp_path):
    from speech_kd.data.audio import AudioError, probe_audio, read_audio

    train_files = sorted((corpus_copy / "train").rglob("*.flac"))
    dev_files = sorted((corpus_copy / "dev").rglob("*.flac"))
    for path in (train_files[3], dev_files[1]):
        _damage_middle(path)
        probe_audio(path)  # prepare's checks pass: the damage is found only when the whole file is read
        with pytest.raises(AudioError, match="unreadable audio"):
            read_audio(path)
    out = tmp_path / "run"
    run_training(
        [
            str(REPO / "hparams/teacher.yaml"),
            f"--data_folder={corpus_copy}",
            f"--output_folder={out}",
            "--number_of_epochs=1",
            *TINY_MODEL,
        ]
    )
    log = (out / "log.txt").read_text()  # SpeechBrain's run log, where our warnings go
    for path in (train_files[3], dev_files[1]):
        assert f"skipping {path}: unreadable audio" in log
    assert (out / "model" / "model.ckpt").exists()
    assert re.findall(r"epoch: (\d+)", (out / "train_log.txt").read_text()) == ["1"]


def test_a_batch_with_no_readable_audio_names_its_utterances(tmp_path, caplog):
    import soundfile as sf

    from speech_kd.data.dataio import collate_readable

    good, broken = tmp_path / "good.flac", tmp_path / "broken.flac"
    sf.write(good, 0.1 * torch.randn(16000).numpy(), 16000)
    broken.write_bytes(b"fLaC" + bytes(200))
    csv = tmp_path / "two.csv"
    csv.write_text(f"ID,duration,wav,spk_id,wrd\nok,1.0,{good},1,HI\nbad,1.0,{broken},1,HI\n")
    data = load_dataset(csv, make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"), skip_unreadable=True)
    ok, bad = (data[i] for i in range(2))
    assert f"skipping {broken}: unreadable audio" in caplog.text
    assert collate_readable([ok, bad]).id == ["ok"]
    with pytest.raises(ValueError, match="utterances bad: none of this batch's audio could be read"):
        collate_readable([bad])
