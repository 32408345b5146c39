"""Issue 16: stale manifests, long files, concurrent and changed runs, small input faults (real tiny corpora)."""

from __future__ import annotations

import csv
import logging
import shutil

from speech_kd.prepare import prepare_librispeech


def _rows(csv_path) -> dict[str, dict]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return {row["ID"]: row for row in csv.DictReader(fh)}


def test_prepare_redoes_a_split_whose_audio_or_transcripts_changed(corpus_copy, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="speech_kd.prepare")
    save = tmp_path / "csv"
    first = _rows(prepare_librispeech(corpus_copy, save, splits=["dev"]).csv_files["dev"])
    trans = sorted((corpus_copy / "dev").glob("*/*/*.trans.txt"))[0]
    lines = trans.read_text().splitlines()
    uid, _, text = lines[0].partition(" ")
    lines[0] = f"{uid} {text[::-1]}"  # edited in place: same size, same folder listing
    trans.write_text("\n".join(lines) + "\n")
    wavs = sorted((corpus_copy / "dev").glob("*/*/*.flac"))
    other = next(w for w in wavs if first[w.stem]["duration"] != first[wavs[0].stem]["duration"])
    shutil.copyfile(other, wavs[0])  # a file replaced by another
    second = _rows(prepare_librispeech(corpus_copy, save, splits=["dev"]).csv_files["dev"])
    assert "redoing split dev (2 file(s) changed, added or removed" in caplog.text
    assert second[uid]["wrd"] == text[::-1].upper()
    assert second[wavs[0].stem]["duration"] == first[other.stem]["duration"]
    caplog.clear()
    prepare_librispeech(corpus_copy, save, splits=["dev"])
    assert "up to date, skipping preparation" in caplog.text


def test_a_byte_order_mark_in_a_transcript_file_is_not_text(corpus_copy, tmp_path):
    trans = sorted((corpus_copy / "dev").glob("*/*/*.trans.txt"))[0]
    trans.write_bytes(b"\xef\xbb\xbf" + trans.read_bytes())
    result = prepare_librispeech(corpus_copy, tmp_path, splits=["dev"])
    assert result.skipped == []
    assert trans.read_text(encoding="utf-8-sig").split()[0] in _rows(result.csv_files["dev"])
