"""Layer-to-layer distillation (``kd_layers``): layer mapping, the layer loss, teachers' hidden states, the cache.

Real SpeechBrain modules (TransformerASR conformer encoders, a CRDNN), the package's tiny random teacher
folders (SpeechBrain and Hugging Face), real cache files.
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import soundfile as sf
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.lobes.models.transformer.TransformerASR import EncoderWrapper, TransformerASR

from speech_kd import KDMixin, make_targets, token_strings
from speech_kd.cli import main
from speech_kd.data.dataio import make_tokenizer
from speech_kd.kd.config import KDConfig, KDSetupError
from speech_kd.kd.layers import LayerProjections, StudentLayers
from speech_kd.kd.losses import layer_loss
from speech_kd.kd.term import layer_term_loss
from speech_kd.nnet.layers import (
    LayerStackError,
    LayerTaps,
    auto_layer_map,
    find_layer_stack,
    output_width,
    teacher_layers_spec,
)
from speech_kd.targets.align import resample_hidden
from speech_kd.targets.cache import CacheError, CacheReader, open_cache, write_cache
from speech_kd.targets.cache.format import decode_hidden, encode_hidden, hidden_nbytes
from speech_kd.targets.strategies import CachedTargets, OnlineTargets, TargetAligner
from speech_kd.targets.teachers.base import TeacherError, load_teacher
from speech_kd.targets.teachers.ensemble import EnsembleTeacher
from speech_kd.testing import make_tiny_hf_ctc, make_tiny_sb_model, make_tiny_sb_wav2vec2, whitenoise


def _conformer(d_model: int = 16, layers: int = 3, seed: int = 0) -> EncoderWrapper:
    torch.manual_seed(seed)
    transformer = TransformerASR(
        input_size=20,
        tgt_vocab=5,
        d_model=d_model,
        nhead=2,
        num_encoder_layers=layers,
        num_decoder_layers=0,
        d_ffn=2 * d_model,
        encoder_module="conformer",
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
    )
    return EncoderWrapper(transformer)


@pytest.fixture(scope="module")
def sb_folder(tmp_path_factory) -> str:
    return make_tiny_sb_model(tmp_path_factory.mktemp("teacher") / "model", num_encoder_layers=3)


@pytest.fixture(scope="module")
def sb_teacher(sb_folder):
    return load_teacher(sb_folder)


# ----------------------------------------------------------------------------- the mapping


def test_auto_mapping_spaces_student_layers_evenly_over_the_teacher():
    assert auto_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}  # the shipped student and teacher
    assert auto_layer_map(12, 24) == {i: 2 * i + 1 for i in range(12)}
    assert auto_layer_map(6, 4) == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 3}  # a deeper student shares teacher layers
    assert KDConfig(kd_layers="auto").layer_pairs(3, 6) == {0: 1, 1: 3, 2: 5}
    assert teacher_layers_spec("auto:3", 6) == [1, 3, 5] and teacher_layers_spec("all", 2) == [0, 1]


def test_kd_layers_yaml_forms_and_refusals():
    assert KDConfig.from_hparams({"kd_layers": {5: 11, 2: 4}}).kd_layers == ((2, 4), (5, 11))
    assert KDConfig.from_hparams({"kd_layers": "2:4,5:11"}).kd_layers == ((2, 4), (5, 11))
    assert KDConfig.from_hparams({"kd_layers": {}}).uses_layers is False  # the yaml's default: off
    assert KDConfig.from_hparams({"kd_layers": [[2, 4]]}).kd_layers == ((2, 4),)  # as kd_run.json writes it
    with pytest.raises(KDSetupError, match="count from 0"):
        KDConfig.from_hparams({"kd_layers": {-1: 2}})
    with pytest.raises(KDSetupError, match="kd_layers='two'"):
        KDConfig.from_hparams({"kd_layers": "two"})
    with pytest.raises(KDSetupError, match="kd_layer_loss='l2': one of l1_cos, mse"):
        KDConfig.from_hparams({"kd_layer_loss": "l2"})
    with pytest.raises(KDSetupError, match="kd_loss=none turns the output KD off, and kd_layers is empty"):
        KDConfig.from_hparams({"kd_loss": "none"})
    with pytest.raises(KDSetupError, match=r"student layer 3 is past the depth of S \(3 layers, 0\.\.2\)"):
        KDConfig(kd_layers=((3, 0),)).layer_pairs(3, 6, student="S")


def test_settings_where_the_kd_term_is_nothing_or_ignored_are_refused_at_setup():
    with pytest.raises(KDSetupError, match="kd_loss=none turns the output KD off, and kd_layer_weight is 0"):
        KDConfig.from_hparams({"kd_loss": "none", "kd_layers": "auto", "kd_layer_weight": 0})
    # without a layer term an untranscribed batch would have a loss without gradient (a crash in backward)
    with pytest.raises(KDSetupError, match="unlabeled_kd_loss=none leaves untranscribed batches no loss at all"):
        KDConfig.from_hparams({"unlabeled_kd_loss": "none"})
    with pytest.raises(KDSetupError, match="kd_layers has kd_layer_weight 0"):
        KDConfig.from_hparams({"unlabeled_kd_loss": "none", "kd_layers": "auto", "kd_layer_weight": 0})
    with pytest.raises(KDSetupError, match="kd_layers='auto' but kd_weight is 0"):
        KDConfig.from_hparams({"kd_layers": "auto", "kd_weight": 0})
    # what stays allowed: layers alone, unlabeled batches on layers alone, a KD weight ramped up from 0
    assert KDConfig.from_hparams({"kd_loss": "none", "kd_layers": "auto"}).layer_term_on
    assert KDConfig.from_hparams({"unlabeled_kd_loss": "none", "kd_layers": {0: 1}}).unlabeled_kd_loss == "none"
    assert KDConfig.from_hparams({"kd_layers": "auto", "kd_weight": 0, "kd_weight_final": 0.5}).uses_layers
    assert KDConfig.from_hparams({"kd_weight": 0}).uses_teacher is False


# ----------------------------------------------------------------------------- finding layers


def test_layer_lists_are_found_in_speechbrain_models_or_named_by_path():
    enc = _conformer()
    modules = {"CNN": torch.nn.Conv1d(2, 2, 3), "enc": enc}
    name, layers = find_layer_stack(modules)
    assert name == "enc.transformer.encoder.layers" and len(layers) == 3
    # the same list reached twice (the yaml's Transformer and the wrapper in modules) is one list
    assert find_layer_stack({"Transformer": enc.transformer, "enc": enc})[1] == layers
    assert find_layer_stack(modules, "enc.transformer.encoder.layers")[1] == layers
    crdnn = CRDNN(input_shape=[None, None, 20], cnn_blocks=1, rnn_layers=1, dnn_blocks=2, dnn_neurons=12)
    name, blocks = find_layer_stack({"model": crdnn})
    assert name == "model.DNN" and [output_width(b) for b in blocks] == [12, 12]
    assert [output_width(layer) for layer in layers] == [16, 16, 16]
    with pytest.raises(LayerStackError, match="found no layer list .looked for a ModuleList named 'layers'"):
        find_layer_stack({"lin": torch.nn.Linear(3, 3)})
    with pytest.raises(LayerStackError, match="nothing at 'enc.encoder.layers'"):
        find_layer_stack(modules, "enc.encoder.layers")
    with pytest.raises(LayerStackError, match="several layer lists"):
        find_layer_stack({"a": _conformer(), "b": _conformer()})


def test_student_without_a_layer_list_is_refused_naming_what_was_looked_for():
    with pytest.raises(KDSetupError, match="kd layers of the student: found no layer list.*kd_student_layers"):
        StudentLayers({"lin": torch.nn.Linear(3, 3)}, {})


# ----------------------------------------------------------------------------- the loss


def test_layer_loss_is_zero_when_the_projected_student_layer_is_the_teacher_layer():
    """Two copies of one conformer: the student's taps through identity projections give the teacher's layers."""
    student, teacher = _conformer(seed=1), _conformer(seed=1)
    student_layers, teacher_layers = find_layer_stack({"s": student})[1], find_layer_stack({"t": teacher})[1]
    pairs = {0: 0, 2: 2}
    taps = LayerTaps(student_layers, pairs)
    teacher_taps = LayerTaps(teacher_layers, pairs.values())
    taps.active = teacher_taps.active = True
    x, lens = torch.randn(2, 7, 20), torch.tensor([1.0, 0.6])
    student.eval(), teacher.eval()
    student(x, lens), teacher(x, lens)
    projections = LayerProjections({s: (16, 16) for s in pairs})
    with torch.no_grad():
        for head in projections.heads.values():
            head.weight.copy_(torch.eye(16))
            head.bias.zero_()
    projected = projections(taps.take())
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    hiddens = teacher_taps.take()
    for kind in ("l1_cos", "mse"):
        assert float(layer_term_loss(projected, hiddens, pairs, mask, kind, "utterance").detach()) < 1e-6
    # a random projection is far from it, and padding frames do not count
    far = LayerProjections({s: (16, 16) for s in pairs})(projected)
    assert float(layer_term_loss(far, hiddens, pairs, mask, "l1_cos", "frame").detach()) > 0.5
    noisy = {k: v.clone() for k, v in hiddens.items()}
    for v in noisy.values():
        v[1, 4:] += 100.0
    assert float(layer_term_loss(projected, noisy, pairs, mask, "mse", "frame").detach()) < 1e-6


def test_layer_loss_reductions_and_gradient_reach_only_the_student():
    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    per_frame = layer_loss(student, teacher, mask, "l1_cos", "frame")
    per_utt = layer_loss(student, teacher, mask, "l1_cos", "utterance")
    assert torch.isclose(per_utt * 2, per_frame * 8)  # 8 valid frames over 2 utterances
    per_utt.backward()
    assert student.grad is not None and teacher.grad is None


# ----------------------------------------------------------------------------- teachers and frames


def test_teacher_hidden_states_come_from_the_same_pass_and_bad_layers_are_refused(sb_teacher, tmp_path):
    wavs = torch.stack([whitenoise(1.2, seed=1), whitenoise(1.2, seed=2)])
    out = sb_teacher(wavs, torch.tensor([1.0, 0.7]), hidden_layers=[0, 2])
    assert sb_teacher.layer_count() == 3 and sorted(out.hiddens) == [0, 2]
    assert out.hiddens[2].shape == (*out.log_probs.shape[:2], 32)
    assert sb_teacher(wavs, torch.ones(2)).hiddens is None  # not asked: nothing kept
    with pytest.raises(TeacherError, match=r"teacher layer 3 is past the depth of teacher speechbrain:model \(3 "):
        sb_teacher(wavs, torch.ones(2), hidden_layers=[3])
    with pytest.raises(TeacherError, match="kd_layers needs one teacher, not the ensemble"):
        EnsembleTeacher([sb_teacher, sb_teacher]).layer_count()


@pytest.mark.parametrize("stable_layer_norm", [False, True])
def test_huggingface_teacher_layer_k_is_the_kth_encoder_layers_output(tmp_path, monkeypatch, stable_layer_norm):
    """Compared with forward hooks on the encoder's layers, not with ``hidden_states``.

    ``hidden_states[-1]`` of a stable-layer-norm model is taken after its final LayerNorm by
    transformers 4.x and before it by 5.x; a layer's own output is the same under both.
    """
    teacher = load_teacher(make_tiny_hf_ctc(tmp_path / "hf", stable_layer_norm=stable_layer_norm))
    encoder = teacher.model.wav2vec2.encoder
    kept: dict[int, torch.Tensor] = {}

    def keeper(index: int):
        def keep(module, inputs, output) -> None:
            kept[index] = output[0] if isinstance(output, tuple) else output

        return keep

    handles = [layer.register_forward_hook(keeper(k)) for k, layer in enumerate(encoder.layers)]
    forward, asked = teacher.model.forward, []
    monkeypatch.setattr(teacher.model, "forward", lambda *a, **kw: asked.append(kw) or forward(*a, **kw))
    out = teacher(whitenoise(1.0)[None], torch.ones(1), hidden_layers=[0, 1])
    for handle in handles:
        handle.remove()
    assert teacher.layer_count() == 2 and teacher.layer_stack_name == "wav2vec2.encoder.layers"
    assert all(torch.equal(out.hiddens[k], kept[k].float()) for k in (0, 1))
    assert not any(kw.get("output_hidden_states") for kw in asked)  # no tensor of every layer
    if stable_layer_norm:  # the last layer's output, before the encoder's final LayerNorm
        with torch.no_grad():
            assert not torch.allclose(out.hiddens[1], encoder.layer_norm(kept[1]), atol=1e-3)
    # kd_teacher_layers names a Hugging Face teacher's layer list too
    teacher.layer_path = "wav2vec2.encoder.layers"
    assert teacher.layer_count() == 2
    teacher.layer_path = "wav2vec2.feature_extractor"
    with pytest.raises(TeacherError, match="'wav2vec2.feature_extractor' is a Wav2Vec2FeatureEncoder, not a"):
        teacher.layer_count()


def test_speechbrain_wav2vec2_teacher_layers_are_its_hugging_face_encoder_layers(tmp_path):
    """The layout of speechbrain/asr-wav2vec2-librispeech: the wav2vec2 layers are found under its encoder."""
    folder, hub = make_tiny_sb_wav2vec2(tmp_path / "model")
    teacher = load_teacher(folder, overrides={"wav2vec2_hub": hub})
    assert teacher.layer_count() == 2 and teacher.layer_stack_name == "encoder.wav2vec2.model.encoder.layers"
    out = teacher(whitenoise(1.0)[None], torch.ones(1), hidden_layers=[1])
    assert out.hiddens[1].shape == (*out.log_probs.shape[:2], 32)


def test_teacher_frames_are_averaged_into_the_students_and_padding_is_masked():
    hidden = torch.arange(12.0).view(1, 6, 2).repeat(2, 1, 1)  # 20 ms teacher frames
    out, lengths = resample_hidden(hidden, torch.tensor([6, 3]), 0.02, 0.04)
    assert lengths.tolist() == [3, 2]
    assert out[0, :, 0].tolist() == [1.0, 5.0, 9.0]  # pairs of frames averaged
    assert out[1, 1, 0] == 4.0  # the last student frame of a 3-frame utterance holds the third frame alone
    aligner = TargetAligner(["<blank>", "A"], 0, 0.02, ["<blank>", "A"], 0, 0.04)
    teacher_out = type("Out", (), {})()
    teacher_out.log_probs, teacher_out.lengths = torch.zeros(2, 6, 2).log_softmax(-1), torch.tensor([6, 3])
    teacher_out.hiddens = {4: hidden}
    targets = aligner(teacher_out, torch.tensor([3, 2]), 3)
    assert targets.hiddens[4].shape == (2, 3, 2) and targets.mask[1].tolist() == [True, True, False]


# ----------------------------------------------------------------------------- the cache


def test_hidden_state_coding_error_and_size():
    x = torch.randn(50, 144) * torch.linspace(0.1, 5.0, 50)[:, None] * torch.linspace(0.5, 2.0, 144)
    channel = x.abs().amax(0)  # b_c
    step = (x.abs() / channel).amax(-1, keepdim=True) / 127 * channel  # a_t * b_c
    for dtype, bound in (("int8", step / 2), ("fp16", x.abs() * 2**-11)):
        data = encode_hidden(x, dtype)
        assert len(data) == hidden_nbytes(50, 144, dtype) == {"int8": 2 * 144 + 50 * 146, "fp16": 2 * 50 * 144}[dtype]
        error = (torch.from_numpy(decode_hidden(data, 50, 144, dtype)) - x).abs()
        assert (error <= bound * 1.01 + 1e-7).all(), dtype
    with pytest.raises(CacheError, match="corrupt hidden states"):
        decode_hidden(encode_hidden(x)[:-1], 50, 144)


def test_int8_hidden_states_keep_the_channels_beside_an_outlier_channel():
    """wav2vec2 / HuBERT layers carry a few channels hundreds of times larger than the rest.

    With one int8 scale per frame (absmax / 127) one channel at 400 rounded 88 % of the other 767
    N(0, 1) channels to 0 (l1_cos 0.70 between stored and true); each channel's own scale keeps them.
    """
    torch.manual_seed(0)
    x = torch.randn(200, 768)
    x[:, 7] = 400.0
    stored = torch.from_numpy(decode_hidden(encode_hidden(x), 200, 768))
    others = torch.arange(768) != 7
    relative = (stored - x)[:, others].norm(dim=-1) / x[:, others].norm(dim=-1)
    assert float(relative.max()) < 0.02
    assert float((stored[:, others] == 0).float().mean()) < 0.02  # only values within half a step of 0
    mask = torch.ones(1, 200, dtype=torch.bool)
    assert float(layer_loss(stored[None], x[None], mask, "l1_cos", "frame")) < 0.01
    assert torch.allclose(stored[:, 7], x[:, 7], rtol=1e-3)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    path = folder / "train.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        for i, seconds in enumerate((1.0, 1.4, 0.8)):
            sf.write(folder / f"u{i}.wav", whitenoise(seconds, seed=i).numpy(), 16000)
            writer.writerow([f"u{i}", seconds, str(folder / f"u{i}.wav"), "s", "A"])
    return path


def test_cache_stores_the_chosen_layers_and_a_cache_without_them_is_refused(sb_teacher, manifest, tmp_path):
    summary = write_cache(sb_teacher, manifest, tmp_path / "hid", hidden_layers="0,2", progress=False, batch_seconds=3)
    assert summary["fp32_bytes"] == summary["frames"] * (len(sb_teacher.tokens) + 32 + 32) * 4  # what it stores
    reader = CacheReader(tmp_path / "hid")
    assert reader.metadata["csv"] == str(manifest.resolve())  # absolute: the rebuild hint works from anywhere
    stack = "encoder.enc.transformer.encoder.layers"
    spec = {"layers": [0, 2], "dims": [32, 32], "dtype": "int8", "depth": 3, "layout": 2, "stack": stack}
    assert reader.hidden_spec() == spec
    wav = torch.from_numpy(sf.read(manifest.parent / "u1.wav", dtype="float32")[0])[None]
    alone = sb_teacher(wav, torch.ones(1), hidden_layers=[2]).hiddens[2][0]
    stored = reader.hidden("u1", [2])[2]
    relative = (stored - alone[: len(stored)]).norm(dim=-1) / alone[: len(stored)].norm(dim=-1)
    assert float(relative.median()) < 0.02  # int8 coding plus what batching with padding changes
    batch = reader.batch(["u0", "u1"], hidden_layers=[0, 2])
    assert batch.hiddens[0].shape == (2, int(batch.lengths.max()), 32)
    aligner = TargetAligner(sb_teacher.tokens, 0, sb_teacher.frame_shift, sb_teacher.tokens, 0, 0.04)
    cached = CachedTargets(reader, aligner)
    assert cached.request_layers([2]) == {2: 32} and cached.layer_count() == 3
    hint = (
        r"needs teacher layers \[1\], but cache .*hid stores only layers \[0, 2\]: "
        rf"rebuild .*teacher \(.+\): .*--csv {re.escape(str(manifest.resolve()))} "
    )
    with pytest.raises(CacheError, match=hint):
        cached.request_layers([1])
    # a cache written without hidden states (as before) reads as before, and is refused for kd_layers
    write_cache(sb_teacher, manifest, tmp_path / "plain", progress=False, batch_seconds=3)
    plain = CachedTargets(CacheReader(tmp_path / "plain"), aligner)
    assert torch.equal(plain.reader.batch(["u0"]).log_probs, CacheReader(tmp_path / "hid").batch(["u0"]).log_probs)
    with pytest.raises(CacheError, match=r"stores no hidden states: rebuild .*--hidden_layers auto:3"):
        plain.layer_count(wanted="auto:3")
    # the live teacher: the same layers from the same forward pass
    online = OnlineTargets(sb_teacher, aligner, 16000)
    assert online.request_layers([0, 2]) == {0: 32, 2: 32}
    with pytest.raises(CacheError, match="--hidden_layers: .*teacher has 3 layers"):
        write_cache(sb_teacher, manifest, tmp_path / "bad", hidden_layers="5", progress=False)
    with pytest.raises(CacheError, match="--hidden_layers: kd_layers needs one teacher, not the ensemble"):
        write_cache(EnsembleTeacher([sb_teacher]), manifest, tmp_path / "ens", hidden_layers="all", progress=False)
    assert np.isfinite(batch.hiddens[2].numpy()).all()
    # hidden states of the unreleased layout before channel scales (no "layout") are refused, not misread
    meta = json.loads((tmp_path / "hid" / "meta.json").read_text())
    del meta["scheme"]["hidden"]["layout"]
    (tmp_path / "hid" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="stores teacher hidden states in layout 1, this code reads 2"):
        CachedTargets(CacheReader(tmp_path / "hid"), aligner).layer_count()


def test_a_union_of_caches_gives_each_common_layer_its_own_width(sb_teacher, manifest, tmp_path, monkeypatch):
    for name, layers in (("a", "0,1,2"), ("b", "1,2")):
        write_cache(sb_teacher, manifest, tmp_path / name, hidden_layers=layers, progress=False, batch_seconds=3)
    union = open_cache(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert union.hidden_spec()["layers"] == [1, 2] and union.hidden_spec()["dims"] == [32, 32]
    # layers of other widths (a teacher whose layers differ in width): each keeps its own
    first, second = union.readers
    monkeypatch.setattr(
        first, "hidden_spec", lambda: {**CacheReader(tmp_path / "a").hidden_spec(), "dims": [8, 16, 24]}
    )
    monkeypatch.setattr(second, "hidden_spec", lambda: {**CacheReader(tmp_path / "b").hidden_spec(), "dims": [16, 24]})
    assert union.hidden_spec()["layers"] == [1, 2] and union.hidden_spec()["dims"] == [16, 24]


def test_the_cache_records_the_teachers_layer_list_and_a_run_naming_another_is_refused(
    sb_folder, sb_teacher, manifest, tmp_path
):
    stack = "encoder.enc.transformer.encoder.layers"
    cache = ["cache-targets", "--teacher", sb_folder, "--csv", str(manifest), "--batch_seconds", "3"]
    assert main([*cache, "--out", str(tmp_path / "named"), "--hidden_layers", "1", "--teacher_layers", stack]) == 0
    write_cache(sb_teacher, manifest, tmp_path / "found", hidden_layers="1", progress=False, batch_seconds=3)
    aligner = TargetAligner(sb_teacher.tokens, 0, sb_teacher.frame_shift, sb_teacher.tokens, 0, 0.04)
    for name in ("named", "found"):  # found or named, the list is recorded by its path
        cached = CachedTargets(CacheReader(tmp_path / name), aligner)
        assert cached.reader.hidden_spec()["stack"] == stack
        assert cached.layer_count(None) == cached.layer_count(stack) == 3
        with pytest.raises(CacheError, match=rf"kd_teacher_layers=encoder.dnn.layers but cache .*{name} stores "):
            cached.layer_count("encoder.dnn.layers")
    with pytest.raises(
        CacheError, match="--hidden_layers / --teacher_layers: kd layers of teacher .*nothing at 'enc.x'"
    ):
        write_cache(sb_teacher, manifest, tmp_path / "bad", hidden_layers="1", teacher_layers="enc.x", progress=False)
    with pytest.raises(CacheError, match="--teacher_layers enc.x: names the layer list that --hidden_layers stores"):
        write_cache(sb_teacher, manifest, tmp_path / "bad", teacher_layers="enc.x", progress=False)


# ----------------------------------------------------------------------------- KDMixin with kd_layers

ALPHABET = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TinyEncoder(torch.nn.Module):
    """An input projection, then a list of three layers; ``skip`` leaves layers out of a forward (LayerDrop)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(40, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(3)])
        self.skip: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for index, layer in enumerate(self.layers):
            if index not in self.skip:
                x = torch.relu(layer(x))
        return x


class LayerRecipe(sb.Brain):
    """A recipe's Brain over ``enc`` (or, with ``hparams.detached``, a copy the layers were not found in)."""

    def compute_forward(self, batch, stage):
        wavs, wav_lens = batch.sig
        feats = self.hparams.compute_features(wavs)[:, ::4]  # 40 ms frames
        encoder = getattr(self.hparams, "detached", None) or self.modules.enc
        return self.hparams.log_softmax(self.modules.lin(encoder(feats))), wav_lens

    def compute_objectives(self, predictions, batch, stage):
        tokens, token_lens = batch.tokens
        return sb.nnet.losses.ctc_loss(predictions[0], tokens, predictions[1], token_lens, blank_index=0)


class LayerKDRecipe(KDMixin, LayerRecipe):
    pass


def _layer_brain(sb_folder: str, optimizer: bool = True, encoder: TinyEncoder | None = None, **extra) -> LayerKDRecipe:
    torch.manual_seed(0)
    run_opts = {"device": "cpu", "noprogressbar": True, **extra.pop("run_opts", {})}
    hparams = {
        "compute_features": sb.lobes.features.Fbank(n_mels=40),
        "log_softmax": torch.nn.LogSoftmax(dim=-1),
        "teacher_source": sb_folder,
        "kd_weight": 0.5,
        "kd_layers": {0: 0, 2: 2},
        "blank_index": 0,
        "sample_rate": 16000,
        **extra,
    }
    brain = LayerKDRecipe(
        modules={"enc": encoder or TinyEncoder(), "lin": torch.nn.Linear(16, len(ALPHABET) + 1)},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.01),
        hparams=hparams,
        run_opts=run_opts,
    )
    brain.attach_targets(make_targets(hparams, token_strings(make_tokenizer(ALPHABET))))
    if optimizer:
        brain.init_optimizers()
        brain.on_stage_start(sb.Stage.TRAIN, 1)
    return brain


def _layer_batch() -> PaddedBatch:
    tokenizer = make_tokenizer(ALPHABET)
    rows = [
        {
            "id": f"u{i}",
            "sig": whitenoise(1.0 + 0.3 * i, seed=i),
            "wrd": w,
            "tokens": tokenizer.encode_sequence_torch(list(w)),
        }
        for i, w in enumerate(("HELLO", "A CAT"))
    ]
    return PaddedBatch(rows)


def test_a_student_whose_layer_hooks_never_fire_is_refused_on_the_first_batch(sb_folder):
    brain = _layer_brain(sb_folder)
    brain.hparams.detached = TinyEncoder()  # the forward pass goes through another copy of the encoder
    with pytest.raises(KDSetupError, match=r"no layer of the student's enc.layers ran in the first training batch"):
        brain.fit_batch(_layer_batch())
    # LayerDrop skipping every mapped layer of a batch: that batch's layer loss is 0, training goes on
    brain = _layer_brain(sb_folder)
    brain.modules.enc.skip = {0, 2}
    brain.fit_batch(_layer_batch())
    assert brain.kd_stats()["layer_loss"] == 0.0
    brain.modules.enc.skip = set()
    brain.fit_batch(_layer_batch())
    assert brain.kd_stats()["layer_loss"] > 0.0


def test_targets_attached_again_keep_the_projections_the_optimiser_holds(sb_folder):
    brain = _layer_brain(sb_folder, optimizer=False)
    projections = brain.modules.kd_layer_projections
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.fit_batch(_layer_batch())
    hparams = vars(brain.hparams)
    brain.attach_targets(make_targets(hparams, token_strings(make_tokenizer(ALPHABET))))  # as bench's speed does
    assert brain.modules.kd_layer_projections is projections
    before = projections.heads["0"].weight.detach().clone()
    brain.fit_batch(_layer_batch())
    assert not torch.equal(before, projections.heads["0"].weight)  # still trained by the optimiser
    brain.hparams.kd_layers = {1: 2}  # other pairs, once the optimiser exists: refused
    with pytest.raises(KDSetupError, match=r"kd_layers: the targets attached now map layers \{1: 2\}"):
        brain.attach_targets(make_targets(hparams, token_strings(make_tokenizer(ALPHABET))))
    # before the optimiser exists, other pairs get new projections
    brain = _layer_brain(sb_folder, optimizer=False)
    brain.hparams.kd_layers = {1: 2}
    brain.attach_targets(make_targets(vars(brain.hparams), token_strings(make_tokenizer(ALPHABET))))
    assert list(brain.modules.kd_layer_projections.heads) == ["1"]


def test_jit_scripting_the_student_is_refused_with_kd_layers(sb_folder):
    with pytest.raises(KDSetupError, match=r"forward hooks, which torch.jit.script drops, and --jit scripts enc"):
        _layer_brain(sb_folder, run_opts={"jit": True, "jit_module_keys": ["enc"]})
    _layer_brain(sb_folder, run_opts={"jit": True, "jit_module_keys": ["lin"]})  # not the layers: allowed
    # the layers named from a yaml key (kd_student_layers), scripted as part of the module that holds them
    encoder = TinyEncoder()
    with pytest.raises(KDSetupError, match=r"--jit scripts enc: run without --jit"):
        _layer_brain(
            sb_folder,
            encoder=encoder,
            encoder_yaml=encoder,
            kd_student_layers="encoder_yaml.layers",
            run_opts={"jit": True, "jit_module_keys": ["enc"]},
        )
