"""Transcribe 16 kHz audio with an exported speech_kd model folder: numpy, soundfile and onnxruntime (or torch).

This file is self-contained: ``speech-kd export`` copies it into every exported
folder as ``transcribe.py``, which needs neither speechbrain nor speech_kd::

    python DIR/transcribe.py a.wav b.flac [--threads 1] [--max_batch_seconds 16] [--blank_penalty 0]
    python DIR/transcribe.py long.wav --chunk_seconds 20     # bounded memory for long files

or, from Python, ``ExportedASR(DIR).transcribe_files(["a.wav"])``.

Pipeline: audio (mono, the folder's sample rate) -> log-mel fbank computed
here in numpy (:func:`fbank`; the same numbers as SpeechBrain's ``Fbank``
within 1e-4 dB, tested) -> the network (``model.onnx`` or ``model.ts``:
normalisation, convolution front end, conformer, CTC output layer,
log-softmax) -> greedy CTC decoding (:func:`greedy_decode`). Each utterance's
result does not depend on what else is in its batch.

Shapes: ``S`` samples, ``T`` fbank frames, ``F`` mel bins, ``T'`` output
frames (``frame_shift`` seconds each), ``V`` tokens, ``B`` batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__":  # before numpy loads its BLAS: one BLAS thread (see ExportedASR._one_blas_thread)
    for _name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

import numpy as np

__all__ = ["ExportedASR", "fbank", "mel_blocks", "best_tokens", "greedy_decode", "read_audio", "run_groups", "main",
           "CONFIG_NAME", "CONTEXT_SECONDS", "MAX_BATCH_SECONDS"]

#: the exported folder's description (tokens, frame shift, fbank settings, model file)
CONFIG_NAME = "deploy.json"
#: window and mel filters of the fbank, as SpeechBrain builds them
FEATURES_NAME = "fbank.npz"
#: fbank frames computed at a time: the whole utterance's spectrum at once is a few MB of temporaries whose
#: fresh pages fault in on every call (2.7x slower, measured on 2-6 s utterances); pieces reuse memory
FBANK_PIECE = 64
#: audio (seconds) read before and after each chunk of a long file (``--context_seconds``)
CONTEXT_SECONDS = 2.0
#: files longer than this (seconds) transcribed in one piece get a warning (use --chunk_seconds)
LONG_SECONDS = 60.0
#: padded audio (seconds) per network run: utterances are run longest first, in groups of at most this much
#: (padding included). One padded batch of 8 utterances (41 s) was 5-17 % slower on a 2-core CPU
#: (docs/deploy.md, ``speech-kd bench --max_batch_seconds 0``): its activations no longer fit in the cache
MAX_BATCH_SECONDS = 16.0


def mel_blocks(mel: np.ndarray, blocks: int = 4) -> list[tuple[int, int, int, int, np.ndarray]]:
    """The mel filters ``mel [n_fft // 2 + 1, F]`` as a few dense blocks that skip the matrix's zeros.

    Each filter touches a few neighbouring bins only; cutting the filters into ``blocks`` runs of
    consecutive filters, each block needs the bins its filters touch. Returns
    ``(first_bin, end_bin, first_filter, end_filter, weights [end_bin - first_bin, end_filter - first_filter])``
    per block; the products of the blocks are the dense product's (same sums, float64).

    Example
    -------
    >>> mel = np.zeros((6, 2)); mel[0:3, 0] = 1; mel[3:6, 1] = 1
    >>> [(a, b, c, d) for a, b, c, d, _ in mel_blocks(mel, blocks=2)]
    [(0, 3, 0, 1), (3, 6, 1, 2)]
    """
    out = []
    bounds = np.linspace(0, mel.shape[1], min(blocks, mel.shape[1]) + 1).round().astype(int)
    for first, end in zip(bounds[:-1], bounds[1:]):
        rows = np.flatnonzero(np.any(mel[:, first:end] != 0, axis=1))
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
        out.append((lo, hi, int(first), int(end), np.ascontiguousarray(mel[lo:hi, first:end])))
    return out


def fbank(wav: np.ndarray, window: np.ndarray, mel: np.ndarray | list, hop: int, amin: float = 1e-10,
          top_db: float = 80.0, ref_value: float = 1.0) -> np.ndarray:  # fmt: skip
    """Log-mel filterbank ``[T, F]`` (float32) of one waveform ``wav [S]``, as SpeechBrain's ``Fbank``.

    Centred frames (``n_fft // 2`` zeros at both ends), ``T = 1 + S // hop``; power spectrum of each frame
    times ``window [n_fft]``; ``mel [n_fft // 2 + 1, F]`` filters (or their :func:`mel_blocks`, faster);
    ``10 log10(max(x, amin)) - 10 log10(max(amin, ref_value))``, floored at the utterance's maximum minus
    ``top_db``. Computed in float64.
    """
    n_fft = window.shape[0]
    padded = np.pad(wav.astype(np.float64), (n_fft // 2, n_fft // 2))
    frames = 1 + wav.shape[0] // hop
    windows = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:frames]  # a view: no copy
    blocks = mel_blocks(mel, blocks=1) if isinstance(mel, np.ndarray) else mel
    energies = np.empty((frames, blocks[-1][3]))
    for start in range(0, frames, FBANK_PIECE):  # small temporaries: reused memory, not fresh pages each call
        spectrum = np.fft.rfft(windows[start : start + FBANK_PIECE] * window, n=n_fft, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        for lo, hi, first, end, weights in blocks:
            energies[start : start + FBANK_PIECE, first:end] = power[:, lo:hi] @ weights
    db = 10.0 * np.log10(np.maximum(energies, amin)) - 10.0 * np.log10(max(amin, ref_value))
    return np.maximum(db, db.max() - top_db).astype(np.float32)


def best_tokens(log_probs: np.ndarray, blank: int, blank_penalty: float = 0.0) -> np.ndarray:
    """Best token per frame ``[T']`` of ``log_probs [T', V]``, ``blank_penalty`` subtracted from the blank first."""
    scores = log_probs
    if blank_penalty:
        scores = log_probs.copy()
        scores[:, blank] -= blank_penalty
    return scores.argmax(axis=-1)


def greedy_decode(log_probs: np.ndarray, blank: int, blank_penalty: float = 0.0, previous: int = -1) -> list[int]:
    """Best path of ``log_probs [T', V]``, repeats merged and blanks removed (token ids).

    ``blank_penalty`` is subtracted from the blank's log-probability first (> 0: fewer deletions).
    ``previous`` is the best token of the frame before the first (a chunk's predecessor; -1: none), so that a
    token whose frames straddle two chunks is emitted once.
    """
    best = best_tokens(log_probs, blank, blank_penalty)
    keep = np.ones_like(best, dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    if best.shape[0]:
        keep[0] = best[0] != previous
    return [int(t) for t in best[keep & (best != blank)]]


def run_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of utterances of ``lengths`` frames, longest first, in groups of at most ``budget`` padded frames.

    A group's padded size is its longest utterance times its count; an utterance longer than ``budget`` runs
    alone. Sorting by length keeps the padding small.

    Example
    -------
    >>> run_groups([300, 640, 500, 610, 420], budget=1300)
    [[1, 3], [2, 4], [0]]
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def read_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Mono float32 samples ``[S]`` of an audio file at ``sample_rate`` (channels averaged)."""
    import soundfile as sf

    wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise ValueError(f"{path}: {rate} Hz; this model takes {sample_rate} Hz audio (resample it first, e.g. "
                         f"sox IN -r {sample_rate} OUT.wav)")  # fmt: skip
    return wav.mean(axis=1)


class ExportedASR:
    """An exported folder, loaded: waveforms in, log-probabilities or text out.

    Parameters
    ----------
    folder : str or os.PathLike
        What ``speech-kd export`` wrote (``deploy.json``, ``fbank.npz``, ``model.onnx`` or ``model.ts``).
    threads : int, optional
        Intra-op threads of the runtime (default: ``$OMP_NUM_THREADS``, else the runtime's own choice).
    blank_penalty : float, optional
        Subtracted from the blank's log-probability at decoding (default: the folder's ``blank_penalty``).
    max_batch_seconds : float, optional
        Padded audio per network run (default :data:`MAX_BATCH_SECONDS`); the utterances given together are
        run longest first in groups of at most this much (:func:`run_groups`). 0: all in one padded batch.
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, blank_penalty: float | None = None,
                 max_batch_seconds: float = MAX_BATCH_SECONDS) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.config = json.loads((self.folder / CONFIG_NAME).read_text(encoding="utf-8"))
        arrays = np.load(self.folder / FEATURES_NAME)
        self.window, self.mel = arrays["window"], arrays["mel"]
        self._mel_blocks = mel_blocks(self.mel)
        try:  # numpy's BLAS held to one thread while the fbank runs (_one_blas_thread)
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        except ImportError:  # a script run sets OPENBLAS_NUM_THREADS itself
            self._blas = None
        self.tokens: list[str] = self.config["tokens"]
        self.blank_index = int(self.config["blank_index"])
        self.sample_rate = int(self.config["sample_rate"])
        self.frame_shift = float(self.config["frame_shift"])
        self.blank_penalty = float(self.config.get("blank_penalty", 0.0) if blank_penalty is None else blank_penalty)
        self.max_batch_seconds = max_batch_seconds
        threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS") or 0)
        self.threads = threads or os.cpu_count() or 1
        model = self.folder / self.config["model_file"]
        self.format = self.config["format"]
        if self.format == "onnx":
            import onnxruntime as ort

            def session(intra_op_threads: int) -> ort.InferenceSession:
                options = ort.SessionOptions()
                options.intra_op_num_threads = intra_op_threads
                options.inter_op_num_threads = 1
                return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

            self._new_session = session
            self._session = session(threads)
            self._one_thread_session = self._session if self.threads == 1 else None  # made when first needed
        elif self.format == "torchscript":
            import torch

            if threads:
                torch.set_num_threads(threads)
            import warnings

            with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it still loads and runs
                warnings.simplefilter("ignore", FutureWarning)
                self._module = torch.jit.load(str(model), map_location="cpu").eval()
        else:
            raise ValueError(f"{self.folder}: unknown format {self.format!r} in {CONFIG_NAME}")

    def features(self, wav: np.ndarray) -> np.ndarray:
        """Fbank ``[T, F]`` of ``wav [S]``; audio shorter than ``min_samples`` is zero-padded to it first."""
        fb = self.config["fbank"]
        wav = np.asarray(wav, dtype=np.float32)
        if wav.shape[0] < int(self.config["min_samples"]):
            wav = np.pad(wav, (0, int(self.config["min_samples"]) - wav.shape[0]))
        return fbank(wav, self.window, self._mel_blocks, fb["hop_length"], fb["amin"], fb["top_db"], fb["ref_value"])

    def _one_blas_thread(self) -> contextlib.AbstractContextManager:
        """Limit numpy's BLAS to one thread (with threadpoolctl, when installed) while the fbank runs.

        The fbank's matrix products are small: BLAS threads gain nothing on them and spin after each call,
        taking the cores from the runtime's own threads (measured: the exported student with 2 threads ran
        3.3x faster than the PyTorch teacher with numpy's BLAS on 2 threads, 9.0x with 1).
        """
        return self._blas.limit(limits=1, user_api="blas") if self._blas is not None else contextlib.nullcontext()

    def _one_thread(self) -> onnxruntime.InferenceSession:  # noqa: F821
        """The one-thread ONNX session that groups run side by side on (made on first use: start-up stays one load)."""
        if self._one_thread_session is None:
            self._one_thread_session = self._new_session(1)
        return self._one_thread_session

    def run(self, feats: np.ndarray, lengths: np.ndarray, one_thread: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The network on padded ``feats [B, T, F]`` (float32) and ``lengths [B]`` (int64).

        Returns ``log_probs [B, T', V]`` and ``out_lengths [B]``. ``one_thread``: on the one-thread ONNX session
        (for runs made side by side from several threads).
        """
        if self.format == "onnx":
            session = self._one_thread() if one_thread else self._session
            log_probs, out_lengths = session.run(None, {"feats": feats, "lengths": lengths})
            return log_probs, out_lengths
        import torch

        with torch.inference_mode():
            log_probs, out_lengths = self._module(torch.from_numpy(feats), torch.from_numpy(lengths))
        return log_probs.numpy(), out_lengths.numpy()

    def log_probs(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Per-utterance ``[T', V]`` log-probabilities of waveforms ``[S]``, in the order given.

        Padded batches of at most ``max_batch_seconds`` (longest first, :func:`run_groups`) when the folder's
        network is exact per utterance in a batch (fp32); otherwise (``batch_exact`` false: int8's activation
        scales are taken over the whole batch) one by one. With ``threads`` > 1 (ONNX) that many groups run
        side by side, one thread each, instead of one group over all threads: the student's matrices are too
        small to split well. Either way an utterance's result does not depend on the others.
        """
        with self._one_blas_thread():
            feats = [self.features(w) for w in wavs]
        lengths = [f.shape[0] for f in feats]
        if not self.config.get("batch_exact", True):
            groups = [[i] for i in range(len(feats))]
        elif self.max_batch_seconds > 0:
            hop = int(self.config["fbank"]["hop_length"])  # samples per fbank frame
            groups = run_groups(lengths, max(int(self.max_batch_seconds * self.sample_rate / hop), 1))
        else:
            groups = [list(range(len(feats)))]
        side_by_side = self.format == "onnx" and self.threads > 1 and len(groups) > 1
        if side_by_side:
            self._one_thread()  # made here, before the threads share it

        def run_group(group: list[int]) -> list[np.ndarray]:
            batch = np.zeros((len(group), max(lengths[i] for i in group), feats[group[0]].shape[1]), dtype=np.float32)
            for row, i in enumerate(group):
                batch[row, : lengths[i]] = feats[i]
            log_probs, out_lengths = self.run(batch, np.array([lengths[i] for i in group], dtype=np.int64),
                                              one_thread=side_by_side)  # fmt: skip
            return [log_probs[row, : int(out_lengths[row])] for row in range(len(group))]

        if side_by_side:  # groups run at once, one thread each: a small network splits badly over threads
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.threads, len(groups))) as pool:
                results = list(pool.map(run_group, groups))
        else:
            results = [run_group(group) for group in groups]
        out: list[np.ndarray] = [np.empty(0)] * len(feats)
        for group, pieces in zip(groups, results):
            for i, piece in zip(group, pieces):
                out[i] = piece
        return out

    def text(self, ids: list[int]) -> str:
        """Words of token ids (``|`` and ``\u2581`` word delimiters as spaces, spaces squeezed)."""
        text = "".join(self.tokens[i] for i in ids).replace("|", " ").replace("\u2581", " ")
        return " ".join(text.split())

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """Transcripts of waveforms ``[S]`` at the folder's sample rate (as :meth:`log_probs` runs them)."""
        return [self.text(greedy_decode(lp, self.blank_index, self.blank_penalty)) for lp in self.log_probs(wavs)]

    def stream_log_probs(self, wav: np.ndarray, chunk_seconds: float = 20.0,
                         context_seconds: float = CONTEXT_SECONDS) -> Iterator[np.ndarray]:  # fmt: skip
        """Log-probabilities ``[T'_i, V]`` of a long waveform ``wav [S]``, chunk after chunk (bounded memory).

        The file is cut into consecutive chunks of ``chunk_seconds`` (rounded to whole output frames); each
        is run with up to ``context_seconds`` of the audio before and after it, and only the chunk's own
        output frames are kept. Concatenated, the pieces have the frame count of the whole file run at once,
        and each frame has seen at least ``context_seconds`` on both sides (or the file's edge). Memory and
        time per chunk depend on ``chunk_seconds + 2 * context_seconds``, not on the file's length;
        ``context_seconds=0`` gives independent chunks (a word cut by a boundary may be lost).
        """
        stride = max(round(self.frame_shift * self.sample_rate), 1)  # samples per output frame
        core = max(round(chunk_seconds * self.sample_rate / stride), 1) * stride
        context = max(round(context_seconds * self.sample_rate / stride), 0) * stride
        for start in range(0, max(wav.shape[0], 1), core):
            first = max(start - context, 0)
            window = wav[first : min(start + core + context, wav.shape[0])]
            out = self.log_probs([window])[0]
            skip = (start - first) // stride
            last = start + core >= wav.shape[0]
            yield out[skip:] if last else out[skip : skip + core // stride]

    def transcribe_long(self, wav: np.ndarray, chunk_seconds: float = 20.0,
                        context_seconds: float = CONTEXT_SECONDS) -> str:  # fmt: skip
        """Transcript of a long waveform ``[S]`` from :meth:`stream_log_probs` (bounded memory).

        Greedy decoding runs across chunk boundaries (a token repeated over a boundary is merged as within a
        chunk), keeping only the last frame's best token between chunks.
        """
        ids: list[int] = []
        previous = -1
        for piece in self.stream_log_probs(wav, chunk_seconds, context_seconds):
            ids += greedy_decode(piece, self.blank_index, self.blank_penalty, previous=previous)
            if piece.shape[0]:
                previous = int(best_tokens(piece[-1:], self.blank_index, self.blank_penalty)[0])
        return self.text(ids)

    def transcribe_files(self, paths: list[str], batch: int = 32) -> list[str]:
        """Transcripts of audio files, read ``batch`` at a time (each read run as :meth:`log_probs` runs them)."""
        out: list[str] = []
        for start in range(0, len(paths), batch):
            out += self.transcribe([read_audio(p, self.sample_rate) for p in paths[start : start + batch]])
        return out


def main(argv: list[str] | None = None) -> int:
    """``python transcribe.py FILE ...``: one ``FILE<TAB>transcript`` line per file."""
    parser = argparse.ArgumentParser(description="Transcribe audio files with this exported model folder.")
    parser.add_argument("files", nargs="+", help="audio files (mono or averaged to mono, at the model's rate)")
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent), help="exported folder")
    parser.add_argument("--batch", type=int, default=32,
                        help="files read at a time (run longest first, in groups of --max_batch_seconds)")  # fmt: skip
    parser.add_argument("--max_batch_seconds", type=float, default=MAX_BATCH_SECONDS,
                        help="padded audio per network run (0: each --batch of files in one padded batch)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: $OMP_NUM_THREADS)")
    parser.add_argument("--blank_penalty", type=float, default=None, help="subtracted from blank log-probs")
    parser.add_argument("--chunk_seconds", type=float, default=0.0,
                        help="> 0: each file in chunks of this many seconds (long files, bounded memory)")  # fmt: skip
    parser.add_argument("--context_seconds", type=float, default=CONTEXT_SECONDS,
                        help="with --chunk_seconds: audio before and after each chunk also read (0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    asr = ExportedASR(args.model, threads=args.threads, blank_penalty=args.blank_penalty,
                      max_batch_seconds=args.max_batch_seconds)  # fmt: skip
    if args.chunk_seconds <= 0:
        import soundfile as sf

        for path in args.files:
            seconds = sf.info(path).duration
            if seconds > LONG_SECONDS:  # self-attention: memory and time grow with the square of the length
                print(f"{path}: {seconds:.0f} s in one piece; attention memory grows with the square of the length "
                      f"(a 9-minute file took 12 GB), consider --chunk_seconds 20", file=sys.stderr)  # fmt: skip
    if args.chunk_seconds > 0:
        texts = [
            asr.transcribe_long(read_audio(p, asr.sample_rate), args.chunk_seconds, args.context_seconds)
            for p in args.files
        ]
    else:
        texts = asr.transcribe_files(args.files, batch=args.batch)
    for path, text in zip(args.files, texts):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
