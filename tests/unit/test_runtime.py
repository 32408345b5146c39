"""keep_freed_memory: freed CPU tensors stay in the process, so the next batch does not page-fault them in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Allocates and frees the same 5 MB of spectrum 20 times, as a training step does its activations,
# and prints the minor page faults per call, then whether keep_freed_memory() is in force.
_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from speech_kd.runtime import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    wavs = torch.randn(8, 64000)
    window = torch.hamming_window(400)
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.stft(wavs, 400, 160, 400, window, return_complex=True)
    before = faults()
    for _ in range(20):
        torch.stft(wavs, 400, 160, 400, window, return_complex=True)
    print((faults() - before) / 20, applied)
    """
)


def _faults_per_call(mode: str, **env) -> tuple[float, bool]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})  # fmt: skip
    faults, applied = out.stdout.split()
    return float(faults), applied == "True"


def test_freed_memory_is_reused_instead_of_page_faulted_in():
    # Without it the count depends on glibc's allocation history: 0 in some processes, 2,500-3,000 (every
    # page of the output and its temporaries) in others; with it, the blocks are reused every time.
    kept, applied = _faults_per_call("keep")
    output_pages = 8 * 401 * 201 * 8 // 4096  # the complex64 spectrum alone: 1,259 pages of 4 KiB
    assert applied
    assert kept < output_pages / 4, kept  # 63-189 seen: buffers MKL maps for itself


def test_can_be_turned_off():
    _, applied = _faults_per_call("keep", SPEECH_KD_KEEP_FREED_MEMORY="0")
    assert not applied
