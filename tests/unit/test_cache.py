"""The soft-target cache: storage scheme, error bound, atomic/resumable writing, damage detection, reading."""

from __future__ import annotations

import csv
import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speech_kd.data.audio import read_audio
from speech_kd.targets.cache import (
    PAD_LOG_PROB,
    CacheError,
    CacheMissError,
    CacheReader,
    data_fingerprint,
    decode,
    encode,
    write_cache,
)
from speech_kd.targets.cache import format as cache_format
from speech_kd.targets.cache import storage as cache_storage
from speech_kd.targets.teachers.base import Teacher, TeacherOutput

SR = 16000
FRAME = 640  # 40 ms
CHARS = ["<blank>", " ", "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]  # 29 tokens


class FramedTeacher(Teacher):
    """A real (tiny) teacher: a fixed random linear layer over RMS-normalised 40 ms frames.

    ``scale`` and ``blank_bias`` make its posteriors CTC-like: mostly confident
    blanks, some confident spikes, a few uncertain frames. It counts the
    utterances it has been run on.
    """

    def __init__(self, seed: int = 0, tokens: list[str] | None = None, scale: float = 30.0, blank_bias: float = 70.0):
        super().__init__()
        self.tokens = list(tokens or CHARS)
        self.blank_index, self.frame_shift, self.sample_rate = 0, FRAME / SR, SR
        self.name = f"framed-linear-{seed}"
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(FRAME, len(self.tokens), bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(len(self.tokens), FRAME, generator=gen) / FRAME**0.5)
        self.scale, self.blank_bias = scale, blank_bias
        self.utterances_run = 0

    def posteriors(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        batch, samples = wavs.shape
        frames = samples // FRAME
        x = wavs[:, : frames * FRAME].reshape(batch, frames, FRAME)
        x = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8)
        logits = self.scale * self.proj(x)
        logits[..., self.blank_index] += self.blank_bias
        lengths = torch.div(torch.round(wav_lens * samples).long(), FRAME, rounding_mode="floor")
        self.utterances_run += batch
        return TeacherOutput(torch.log_softmax(logits, -1), lengths)


# --------------------------------------------------------------------------- helpers


def peaky_log_probs(frames: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Synthetic CTC-like posteriors ``[T, V]``: 70% blank frames, spikes, 10% two-token transitions.

    The mass left to the other tokens is log-uniform in 1e-6..3e-2, spread
    unevenly (a few runner-ups), so frames range from certain to uncertain.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(frames)
    top = torch.where(torch.rand(frames, generator=gen) < 0.7, 0, torch.randint(1, vocab, (frames,), generator=gen))
    second = torch.randint(0, vocab, (frames,), generator=gen)
    rest = 10 ** (-6 + 4.5 * torch.rand(frames, generator=gen, dtype=torch.float64))
    split = torch.where(torch.rand(frames, generator=gen) < 0.1, 0.2 + 0.5 * torch.rand(frames, generator=gen), 0.0)
    weights = torch.exp(2 * torch.randn(frames, vocab, generator=gen, dtype=torch.float64))
    weights[rows, top] = 0
    probs = weights / weights.sum(-1, keepdim=True) * rest[:, None]
    probs[rows, top] += (1 - rest) * (1 - split)
    probs[rows, second] += (1 - rest) * split
    return probs.log().float()


def error_and_bound(log_probs: torch.Tensor, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame max abs probability error of the round trip, and the documented bound.

    ``|p_hat - p| <= 1.16 m + 0.04 (1 - p_top) + 1e-8`` with ``m`` the true mass of the tokens not kept
    (module docstring of speech_kd.targets.cache.format).
    """
    vocab = log_probs.shape[1]
    probs = torch.log_softmax(log_probs.double(), -1).exp()
    err = (decode(enc, vocab).double().exp() - probs).abs().max(-1).values
    kept = torch.from_numpy(enc.counts.astype(np.int64))
    frame = torch.repeat_interleave(torch.arange(len(kept)), kept)
    ids = torch.from_numpy(enc.ids.astype(np.int64))
    stored_mass = torch.zeros(len(kept), dtype=torch.float64).index_add_(0, frame, probs[frame, ids])
    top = probs.max(-1).values
    return err, 1.16 * (1 - stored_mass).clamp(min=0) + 0.04 * (1 - top) + 1e-8


def scaled_kl(teacher: torch.Tensor, decoded: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per frame ``T^2 KL(teacher^T || decoded^T)`` ``[T]`` (the KD loss's own scale)."""
    a = torch.log_softmax(teacher.double() / temperature, -1)
    b = torch.log_softmax(decoded.double() / temperature, -1)
    return temperature**2 * (a.exp() * (a - b)).sum(-1)


def write_corpus(folder: Path, durations: list[float], seed: int = 0) -> Path:
    """Real WAV/FLAC files (16 kHz mono noise and sines) and their SpeechBrain CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, seconds in enumerate(durations):
        t = np.arange(int(seconds * SR)) / SR
        sig = 0.1 * rng.standard_normal(len(t)) + 0.05 * np.sin(2 * np.pi * (200 + 50 * i) * t)
        path = folder / f"utt{i:03d}.{'flac' if i % 2 else 'wav'}"
        sf.write(path, sig.astype(np.float32), SR)
        rows.append(
            {"ID": f"utt{i:03d}", "duration": f"{len(t) / SR:.4f}", "wav": str(path), "spk_id": "s0", "wrd": "A"}
        )
    csv_path = folder / "data.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def reference(teacher: Teacher, wav: str) -> torch.Tensor:
    """The teacher's log-probs ``[T, V]`` for one file run alone."""
    sig = read_audio(wav, SR)[None]
    out = teacher(sig, torch.ones(1))
    return out.log_probs[0, : int(out.lengths[0])]


def manifest_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


DURATIONS = [3.0, 7.3, 5.1, 8.0, 4.4, 6.6, 2.2, 9.0, 5.5, 7.7, 3.3, 6.0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("audio"), DURATIONS)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """A finished cache of the corpus in 4 shards of 3 utterances."""
    out = tmp_path_factory.mktemp("cache") / "targets"
    summary = write_cache(FramedTeacher(), corpus, out, shard_utts=3, batch_seconds=20.0, progress=False)
    return out, summary


@pytest.fixture()
def cache_copy(built, tmp_path) -> Path:
    """A private copy of the finished cache (for tests that damage it)."""
    return Path(shutil.copytree(built[0], tmp_path / "targets"))


# --------------------------------------------------------------------------- storage scheme


def test_peaky_char_roundtrip_error_bound_and_size():
    log_probs = peaky_log_probs(20000, len(CHARS))
    enc = encode(log_probs)
    err, bound = error_and_bound(log_probs, enc)
    assert bool((err <= bound + 1e-6).all())
    assert float(err.max()) < 0.05
    rec = decode(enc, len(CHARS)).double().exp()
    assert torch.allclose(rec.sum(-1), torch.ones(len(rec), dtype=torch.float64), atol=1e-5)
    codes, ids, probs = cache_format.to_codes(enc)
    bytes_per_frame = (len(codes) + len(ids) + len(probs)) / len(log_probs)
    print(
        f"char vocab: {bytes_per_frame:.2f} bytes/frame after runs, max abs prob error {float(err.max()):.4f}, "
        f"{(enc.counts == 1).mean():.0%} one-token frames"
    )
    assert enc.ids.dtype == np.uint8
    assert bytes_per_frame <= 4.0


def test_bpe_5000_vocab_stays_small():
    log_probs = peaky_log_probs(4000, 5000, seed=1)
    enc = encode(log_probs)
    err, bound = error_and_bound(log_probs, enc)
    assert enc.ids.dtype == np.uint16
    assert bool((err <= bound + 1e-6).all())
    bytes_per_frame = enc.nbytes / len(log_probs)
    utts = [(f"u{i}", encode(log_probs[i * 400 : (i + 1) * 400])) for i in range(10)]
    shard_bytes = sum(len(piece) for piece in cache_format.shard_pieces(utts, 5000))
    print(
        f"5000-token vocab: {bytes_per_frame:.2f} payload bytes/frame before runs and compression, "
        f"{shard_bytes / len(log_probs):.2f} in a shard file (fp32 would be 20000)"
    )
    assert bytes_per_frame <= 8.0 and shard_bytes / len(log_probs) <= 5.0


def test_confident_frame_keeps_its_tail_for_the_temperature():
    """The frame of the review: blank 0.985, one letter 0.01. At max_temperature 1 the letter is not needed
    (the residual byte keeps the tail's mass); at 2 it is kept, and T^2 KL at T = 2 stays small."""
    probs = torch.tensor([[0.985, 0.01] + [0.005 / 27] * 27])
    lp = probs.log()
    at_one = encode(lp, top_k=8, mass=0.98, max_temperature=1.0)
    at_two = encode(lp, top_k=8, mass=0.98, max_temperature=2.0)
    assert at_one.counts.tolist() == [1] and int(at_two.counts[0]) >= 2
    assert float(scaled_kl(lp, decode(at_one, 29), 1.0)) < 0.03  # the format before: 0.15
    assert float(scaled_kl(lp, decode(at_two, 29), 2.0)) < 0.02
    # the format before: the letter dropped and the tail floored at 1e-6 cost 4.55 nats at T = 2
    floored = torch.tensor([[1.0] + [1e-6 / 28] * 28]).log()
    assert float(scaled_kl(lp, floored, 2.0)) > 4.0


def test_one_token_frame_costs_an_id_and_a_residual_byte():
    probs = torch.tensor([[0.999, 0.0005, 0.0005], [0.9, 0.09, 0.01], [0.97, 0.03, 0.0]])
    enc = encode(probs.clamp_min(1e-12).log(), top_k=8, mass=0.98)
    assert enc.counts.tolist() == [1, 2, 2]
    assert enc.ids.tolist() == [0, 0, 1, 0, 1]
    # per frame: bytes of the kept tokens after the first, then the residual byte (255: nothing left)
    token = cache_format.to_byte(torch.tensor([0.09, 0.03]).log()).tolist()
    residual = cache_format.residual_byte(torch.tensor([0.001, 0.01, 0.0]).clamp_min(1e-12).log()).tolist()
    assert enc.probs.tolist() == [residual[0], token[0], residual[1], token[1], residual[2]]
    assert token[0] == 33 and residual[:2] == [96, 64]  # -log(p) / LOG_STEP rounded; the residual to 4 steps
    rec = decode(enc, 3).exp()
    assert torch.allclose(rec, probs, atol=0.0015)


def test_runs_of_one_token_frames_take_one_code_one_id_one_byte():
    blank_run = torch.full((300, 5), -30.0)
    blank_run[:, 0] = 0.0
    spike = torch.tensor([[-30.0, 0.0, -30.0, -30.0, -30.0], [-0.4, -1.1, -30.0, -30.0, -30.0]])
    log_probs = torch.cat([blank_run, spike, blank_run[:3]])
    enc = encode(log_probs)
    codes, ids, probs = cache_format.to_codes(enc)
    # 300 blanks = runs of 128 + 128 + 44, one 'token 1' frame, one two-token frame, 3 blanks
    assert codes.tolist() == [255, 255, 127 + 44, 128, 2, 127 + 3]
    assert ids.tolist() == [0, 0, 0, 1, 0, 1, 0]
    assert len(probs) == len(ids)
    counts, frame_ids, frame_probs = cache_format.from_codes(codes, ids, probs)
    assert np.array_equal(counts, enc.counts) and np.array_equal(frame_ids, enc.ids)
    assert np.array_equal(frame_probs, enc.probs)
    with pytest.raises(CacheError, match="corrupt entry"):
        cache_format.from_codes(codes, ids[:-1], probs)


def test_top_k_cap_and_flat_frames():
    flat = torch.zeros(3, 50)
    enc = encode(flat, top_k=4, mass=0.98)
    assert enc.counts.tolist() == [4, 4, 4]
    assert torch.allclose(decode(enc, 50).exp(), torch.full((3, 50), 0.02), atol=0.002)


@pytest.mark.parametrize("case", range(40))
def test_roundtrip_random_shapes(case):
    """Randomised sweep (seeded per case, so a failure is reproducible by its id): any shape,
    vocabulary, top-k, mass, temperature and sharpness round-trips within the stated error bound."""
    rng = np.random.default_rng(case)
    frames, vocab, top_k = int(rng.integers(1, 400)), int(rng.integers(2, 301)), int(rng.integers(1, 13))
    mass, sharpness = float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.0, 30.0))
    max_temperature = float(rng.choice([1.0, 2.0, 4.0]))
    gen = torch.Generator().manual_seed(case)
    log_probs = torch.log_softmax(sharpness * torch.randn(frames, vocab, generator=gen), -1)
    enc = encode(log_probs, top_k=top_k, mass=mass, max_temperature=max_temperature)
    assert enc.num_frames == frames and int(enc.counts.max()) <= min(top_k, vocab)
    assert len(enc.ids) == int(enc.counts.sum()) and len(enc.probs) == int(enc.counts.sum())
    counts, frame_ids, frame_probs = cache_format.from_codes(*cache_format.to_codes(enc))
    assert np.array_equal(counts, enc.counts) and np.array_equal(frame_ids, enc.ids)
    assert np.array_equal(frame_probs, enc.probs)
    err, bound = error_and_bound(log_probs, enc)
    assert bool((err <= bound + 1e-6).all())
    assert torch.isfinite(decode(enc, vocab)).all()


def test_data_fingerprint_ignores_order_and_float_format():
    a = data_fingerprint([("u1", 1.5), ("u2", 2.25)])
    assert a == data_fingerprint([("u2", "2.2500"), ("u1", 1.5)])
    assert a != data_fingerprint([("u1", 1.5), ("u2", 2.5)])
    assert a != data_fingerprint([("u1", 1.5)])


# --------------------------------------------------------------------------- writing and reading


def test_write_cache_end_to_end(built, corpus):
    out, summary = built
    teacher = FramedTeacher()
    assert summary["utterances"] == len(DURATIONS) and summary["shards"] == 4
    assert summary["frames"] == sum(math.floor(float(r["duration"]) * SR) // FRAME for r in manifest_rows(corpus))
    assert summary["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert summary["fp32_bytes"] == summary["frames"] * len(CHARS) * 4
    assert summary["compression_ratio"] == pytest.approx(summary["fp32_bytes"] / summary["bytes"])
    assert summary["bytes_per_frame"] <= 6.0  # 4 tiny shards: meta.json and shard headers weigh here
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + [f"shard-{i:05d}.bin" for i in range(4)] + [
        "shards.json"
    ]
    reader = CacheReader(out, verify=True)
    meta = reader.metadata
    assert meta["complete"] and meta["teacher_fingerprint"] == teacher.fingerprint()
    assert meta["teacher_tokens"] == CHARS and meta["scheme"]["top_k"] == 8 and meta["frames"] == summary["frames"]
    assert reader.ids == {r["ID"] for r in manifest_rows(corpus)}
    for row in manifest_rows(corpus)[:4]:
        ref = reference(teacher, row["wav"])
        got = reader.get(row["ID"])
        assert got.shape == ref.shape and got.dtype == torch.float32
        _, bound = error_and_bound(ref, encode(ref))  # the teacher run alone vs in a padded batch: same bound
        assert float((got.exp() - ref.exp()).abs().max()) <= float(bound.max()) + 1e-4


def test_whole_cache_folder_bytes_per_frame(tmp_path):
    """The size goal, measured on the folder: <= 4 bytes per teacher frame for peaky character posteriors."""
    csv_path = write_corpus(tmp_path / "audio", [12.0 + 0.5 * i for i in range(20)], seed=1)
    summary = write_cache(FramedTeacher(), csv_path, tmp_path / "c", progress=True)
    print(
        f"whole cache folder: {summary['bytes_per_frame']:.2f} bytes/teacher frame, "
        f"{summary['compression_ratio']:.0f}x smaller than fp32 ({summary['frames']} frames)"
    )
    assert summary["frames"] > 6000
    assert summary["bytes_per_frame"] <= 4.0


def test_batch_pads_with_certain_blank_and_lists_missing_ids(built):
    reader = CacheReader(built[0])
    out = reader.batch(["utt006", "utt007"])  # 2.2 s and 9.0 s
    assert out.lengths.tolist() == [55, 225] and out.lengths.dtype == torch.int64
    assert out.log_probs.shape == (2, 225, len(CHARS))
    assert torch.equal(out.log_probs[0, :55], reader.get("utt006"))
    pad = out.log_probs[0, 55:]
    assert torch.all(pad[:, 0] == 0) and torch.allclose(pad[:, 1:], torch.tensor(PAD_LOG_PROB))
    assert "utt001" in reader and "nope" not in reader
    with pytest.raises(CacheMissError, match="2 utterance.*nope, gone") as info:
        reader.batch(["utt001", "nope", "gone"])
    assert info.value.missing == ["nope", "gone"]


def test_rerun_of_finished_cache_runs_no_teacher(built, corpus, cache_copy):
    teacher = FramedTeacher()
    summary = write_cache(teacher, corpus, cache_copy, shard_utts=3, batch_seconds=20.0, progress=False)
    assert teacher.utterances_run == 0 and summary["reused_utterances"] == len(DURATIONS)
    assert summary["frames"] == built[1]["frames"]


def test_resume_after_kill_only_runs_missing_utterances(built, corpus, cache_copy):
    listing = json.loads((cache_copy / "shards.json").read_text())
    last = listing["shards"].pop()
    (cache_copy / "shards.json").write_text(json.dumps(listing))  # killed before the last shard was listed
    (cache_copy / "shard-00004.bin.tmp.999").write_bytes(b"half a shard")  # and in the middle of a next one
    meta = json.loads((cache_copy / "meta.json").read_text())
    (cache_copy / "meta.json").write_text(json.dumps({**meta, "complete": False, "frames": None}))
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(cache_copy)

    teacher = FramedTeacher()
    summary = write_cache(teacher, corpus, cache_copy, shard_utts=3, batch_seconds=20.0, progress=False)
    assert teacher.utterances_run == last["utterances"] == 3
    assert summary["reused_utterances"] == len(DURATIONS) - 3 and summary["teacher_utterances"] == 3
    assert not list(cache_copy.glob("*.tmp*"))
    assert json.loads((cache_copy / "shards.json").read_text())["shards"][-1] == last  # rewritten identically
    assert CacheReader(cache_copy, verify=True).ids == CacheReader(built[0]).ids


def test_cache_of_an_older_format_is_refused_with_rebuild(cache_copy):
    meta = json.loads((cache_copy / "meta.json").read_text())
    (cache_copy / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(CacheError, match="cache format 1, this code reads 3; rebuild the cache"):
        CacheReader(cache_copy)


def test_truncated_shard_is_named(cache_copy):
    shard = cache_copy / "shard-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    problems = CacheReader(cache_copy).verify()
    assert len(problems) == 1 and problems[0].startswith("shard-00002.bin") and "truncated" in problems[0]
    with pytest.raises(CacheError, match="shard-00002.bin"):
        CacheReader(cache_copy, verify=True)
    with pytest.raises(CacheError, match="shard-00002.bin.*truncated"):
        CacheReader(cache_copy).get("utt000")


def test_corrupted_byte_is_detected(cache_copy):
    shard = cache_copy / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0x5A
    shard.write_bytes(bytes(data))
    assert CacheReader(cache_copy).verify() == ["shard-00001.bin: sha256 mismatch (corrupted)"]


def test_damaged_block_is_an_error_when_read_not_wrong_targets(cache_copy):
    """A flipped byte inside a compressed block, read without verify(): an error naming shard and block."""
    shard = cache_copy / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0x5A  # inside the shard's last (only) block
    shard.write_bytes(bytes(data))
    reader = CacheReader(cache_copy)
    in_shard = [uid for uid in sorted(reader.ids) if reader._where()[uid].shard == 1]
    assert in_shard
    for uid in in_shard:
        with pytest.raises(CacheError, match=r"shard-00001.bin block 0: damaged compressed block"):
            reader.get(uid)


def test_corrupted_shard_is_recomputed_on_rerun(corpus, cache_copy):
    shard = cache_copy / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    teacher = FramedTeacher()
    write_cache(teacher, corpus, cache_copy, shard_utts=3, batch_seconds=20.0, progress=False)
    assert teacher.utterances_run == 3
    assert CacheReader(cache_copy, verify=True).verify() == []


def test_other_teacher_or_data_into_the_same_folder_is_refused(corpus, cache_copy, tmp_path):
    with pytest.raises(CacheError, match="teacher fingerprint [0-9a-f]{16} != [0-9a-f]{16}"):
        write_cache(FramedTeacher(seed=1), corpus, cache_copy, progress=False)
    rows = manifest_rows(corpus)[:-1]
    fewer = tmp_path / "fewer.csv"
    with open(fewer, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CacheError, match="scheme"):
        write_cache(FramedTeacher(), corpus, cache_copy, top_k=4, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty"):
        write_cache(FramedTeacher(), corpus, tmp_path / "other", progress=False)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_that_lost_rows_resumes_and_keeps_every_shard(corpus, cache_copy, tmp_path):
    """A row deleted from the manifest (a bad file) resumes; nothing stored is lost."""
    before = {p.name: p.read_bytes() for p in cache_copy.glob("shard-*.bin")}
    rows = manifest_rows(corpus)
    fewer = _write_rows(tmp_path / "fewer.csv", rows[:4] + rows[5:])
    teacher = FramedTeacher()
    summary = write_cache(teacher, fewer, cache_copy, progress=False)
    assert teacher.utterances_run == 0 and summary["reused_utterances"] == len(rows) - 1
    assert {p.name: p.read_bytes() for p in cache_copy.glob("shard-*.bin")} == before
    reader = CacheReader(cache_copy)
    assert reader.ids == {r["ID"] for r in rows} and reader.metadata["csv"] == str(fewer)
    assert not (cache_copy / ".lock").exists()


def test_other_audio_under_a_cached_id_is_refused_naming_it(corpus, cache_copy, tmp_path):
    rows = manifest_rows(corpus)
    longer = [dict(r) for r in rows]
    longer[2]["duration"] = f"{float(rows[2]['duration']) + 1:.3f}"
    with pytest.raises(CacheError, match=rf"1 utterance\(s\) with other audio under the same ID: {rows[2]['ID']} "):
        write_cache(FramedTeacher(), _write_rows(tmp_path / "longer.csv", longer), cache_copy, progress=False)
    swapped = [dict(r) for r in rows]
    swapped[3]["wav"] = rows[7]["wav"]  # same duration written, another (bigger) file
    with pytest.raises(CacheError, match=rf"{rows[3]['ID']} \(cache .* bytes != csv .* bytes\)"):
        write_cache(FramedTeacher(), _write_rows(tmp_path / "swapped.csv", swapped), cache_copy, progress=False)


def test_second_writer_is_refused_and_a_dead_ones_lock_taken_over(corpus, cache_copy, tmp_path, caplog):
    import socket
    import subprocess

    lock = cache_copy / ".lock"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        with pytest.raises(ValueError, match=f"another run \\(PID {sleeper.pid} on "):
            write_cache(FramedTeacher(), corpus, cache_copy, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    write_cache(FramedTeacher(), corpus, cache_copy, progress=False)  # its process is gone: taken over
    assert f"taking over the lock of PID {sleeper.pid}" in caplog.text and not lock.exists()


def test_longer_than_max_duration_is_skipped_naming_the_file(corpus, tmp_path, caplog):
    summary = write_cache(FramedTeacher(), corpus, tmp_path / "c", max_duration=8.0, progress=False)
    assert summary["utterances"] == len(DURATIONS) - 1
    long_row = next(r for r in manifest_rows(corpus) if float(r["duration"]) > 8.0)
    assert f"skipping {long_row['ID']} ({long_row['wav']}): 9.0 s, longer than max_duration=8.0 s" in caplog.text


def test_manifest_errors_name_file_and_row(tmp_path):
    no_duration = tmp_path / "a.csv"
    no_duration.write_text("ID,wav\nx,x.wav\n")
    with pytest.raises(CacheError, match=r"a.csv: no column\(s\) duration in the header \(ID,wav\)"):
        write_cache(FramedTeacher(), no_duration, tmp_path / "c", progress=False)
    bad = tmp_path / "b.csv"
    bad.write_text("ID,duration,wav\nx,1.0,x.wav\ny,1.2s,y.wav\n")
    with pytest.raises(CacheError, match=r"b.csv: row 3 \(y\): duration '1.2s' is not a number of seconds"):
        write_cache(FramedTeacher(), bad, tmp_path / "c", progress=False)


def test_check_compatible_says_what_differs(built, corpus):
    reader = CacheReader(built[0])
    teacher = FramedTeacher()
    ids = data_fingerprint((r["ID"], float(r["duration"])) for r in manifest_rows(corpus))
    reader.check_compatible(teacher.fingerprint(), teacher.tokens, ["x"], ids, 0.04)  # student not recorded: ok
    other = FramedTeacher(seed=3).fingerprint()
    with pytest.raises(CacheError, match=f"teacher fingerprint {teacher.fingerprint()} != {other}"):
        reader.check_compatible(teacher_fingerprint=other)
    with pytest.raises(CacheError, match="teacher tokens differ at index 3: 'A' != 'a'"):
        reader.check_compatible(teacher_tokens=CHARS[:3] + ["a"] + CHARS[4:])
    with pytest.raises(CacheError, match="frame shift 0.04 != 0.02"):
        reader.check_compatible(frame_shift=0.02)
    with pytest.raises(CacheError, match="data fingerprint"):
        reader.check_compatible(data_ids_fingerprint="0" * 16)


def test_recorded_student_tokens_are_checked(corpus, tmp_path):
    out = tmp_path / "c"
    write_cache(FramedTeacher(), corpus, out, student_tokens=CHARS[:10], progress=False)
    reader = CacheReader(out)
    reader.check_compatible(student_tokens=CHARS[:10])
    with pytest.raises(CacheError, match="student tokens differ: 10 != 11 tokens"):
        reader.check_compatible(student_tokens=CHARS[:11])


def test_disk_full_removes_temp_and_keeps_finished_shards(corpus, tmp_path, monkeypatch):
    real = cache_storage._write_pieces

    def fail_second_shard(fh, pieces):
        if "shard-00001" in fh.name:
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, pieces)

    monkeypatch.setattr(cache_storage, "_write_pieces", fail_second_shard)
    out = tmp_path / "full"
    with pytest.raises(CacheError, match="disk full while writing shard-00001.bin"):
        write_cache(FramedTeacher(), corpus, out, shard_utts=3, progress=False)
    assert not list(out.glob("*.tmp*"))
    assert [e["name"] for e in json.loads((out / "shards.json").read_text())["shards"]] == ["shard-00000.bin"]
    assert CacheReader(out, allow_incomplete=True).verify() == []
    monkeypatch.setattr(cache_storage, "_write_pieces", real)
    teacher = FramedTeacher()
    write_cache(teacher, corpus, out, shard_utts=3, progress=False)
    assert teacher.utterances_run == len(DURATIONS) - 3


class _Targets(torch.utils.data.Dataset):
    def __init__(self, reader: CacheReader, ids: list[str]) -> None:
        self.reader, self.ids = reader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.reader.get(self.ids[i])


def test_reading_from_dataloader_workers(built):
    reader = CacheReader(built[0])
    ids = sorted(reader.ids)
    expected = reader.batch(ids[:2])  # maps opened in the parent first: workers must not reuse them
    loader = torch.utils.data.DataLoader(_Targets(reader, ids), batch_size=3, num_workers=2, collate_fn=list)
    got = [item for batch in loader for item in batch]
    assert [len(g) for g in got] == [reader.num_frames(uid) for uid in ids]
    assert torch.equal(got[0], expected.log_probs[0, : expected.lengths[0]])
    import pickle

    clone = pickle.loads(pickle.dumps(reader))
    assert clone._maps == {} and torch.equal(clone.get(ids[3]), got[3])


def test_cache_targets_from_a_teacher_folder(corpus, tmp_path):
    testing = pytest.importorskip("speech_kd.testing")
    from speech_kd.targets.cache import cache_targets
    from speech_kd.targets.teachers.base import load_teacher

    folder = tmp_path / "teacher"
    testing.make_tiny_sb_model(folder, seed=0)
    summary = cache_targets(str(folder), corpus, tmp_path / "c", batch_seconds=30.0, progress=False)
    assert summary["utterances"] == len(DURATIONS) and summary["frames"] > 0
    teacher = load_teacher(folder)
    reader = CacheReader(tmp_path / "c", verify=True)
    reader.check_compatible(teacher_fingerprint=teacher.fingerprint(), teacher_tokens=teacher.tokens)
    longest = max(manifest_rows(corpus), key=lambda r: float(r["duration"]))  # not padded in its batch
    ref = reference(teacher, longest["wav"])
    _, bound = error_and_bound(ref, encode(ref))
    got = reader.get(longest["ID"])
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert torch.allclose(got.double().exp().sum(-1), torch.ones(len(got), dtype=torch.float64), atol=1e-4)
    assert float(((got.exp() - ref.exp()).abs().max(-1).values - bound).max()) <= 1e-3
