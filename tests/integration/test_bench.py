"""``speech-kd bench`` runs end to end on CPU and writes the ratio keys the issue pins (timings not asserted)."""

from __future__ import annotations

import json
import math


def test_bench_writes_ratio_table(tmp_path, capsys):
    from speech_kd.cli import main

    out = tmp_path / "not_yet" / "bench.json"  # the folder is made, as evaluate and compare do
    wide = "--cnn_channels_1=32 --d_ffn=256"  # docs/deploy.md's wider student: its shape reaches the models timed
    assert (
        main(
            [
                "bench",
                "--repeats",
                "1",
                "--batch_size",
                "2",
                "--json",
                str(out),
                f"--extra={wide}",
                "--max_batch_seconds",
                "0",
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    for key in (
        "features_vs_librosa",
        "cached_kd_over_plain",
        "online_kd_over_plain",
        "student_speedup",
        "features_vs_sb_per_utt",
        "features_vs_sb_batched",
        "features_stft_only_vs_librosa",
        "rtf_teacher",
        "rtf_student",
        "evaluate_utts_per_s",
        "student_speedup_onnx",
        "student_speedup_exported",
        "student_speedup_exported_int8",
        "peak_rss_mb_teacher_onnx",
        "student_speedup_int8",
        "peak_rss_mb_teacher",
        "peak_rss_mb_student",
        "peak_rss_mb_student_onnx",
        "disk_mb_student_int8",
        "student_params_fraction",
        "cache_gb_librispeech_960h",
        "cache_gb_librispeech_960h_t2",
    ):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert results["peak_rss_mb_student_onnx"] < results["peak_rss_mb_student"]  # no torch in its process
    assert results["device"] == "cpu"
    # a cache kept faithful at T = 2 keeps more of each frame's tail than one for T = 1 (docs/cache.md)
    assert results["cache_bytes_per_frame_t2"] > results["cache_bytes_per_frame"]
    assert results["params_student"] == 334_061 and results["student_params_fraction"] > 0.1
    assert "features_vs_librosa" in capsys.readouterr().out
