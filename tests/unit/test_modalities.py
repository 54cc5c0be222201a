"""Audio and text through the same stages as images (no Ray): routing, decoders, families, parity."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
import soundfile as sf

from medray.encoders import build_tiny_checkpoint, create_encoder, get_spec, spec_to_dict
from medray.pipeline import EncoderActor, StageOptions, decode_batch, read_batch
from medray.platform.decoders.audio import AudioOptions, audio_header, decode_audio, split_windows
from medray.platform.decoders.text import decode_text, is_text, sr_text
from medray.platform.errors import DecodeError, LimitExceeded, UnsupportedFormat
from medray.platform.formats import detect_modality
from medray.testing.media import REPORT, encode, lying_wav, sr_dataset, tone


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("modal")
    return {
        "audio": build_tiny_checkpoint("hf_audio", str(root / "w2v"), arch="wav2vec2"),
        "hubert": build_tiny_checkpoint("hf_audio", str(root / "hubert"), arch="hubert"),
        "text": build_tiny_checkpoint("hf_text", str(root / "bert"), arch="bert"),
        "image": build_tiny_checkpoint("hf_image", str(root / "vit"), arch="vit", image_size=32),
    }


# ----------------------------------------------------------------------------- routing
def test_routing_by_content_not_name(tmp_path):
    wav = encode(tone(16000, 0.5), 16000)
    assert detect_modality(wav, "scan.dcm") == ("audio", "audio")
    assert detect_modality(encode(tone(16000, 0.5), 16000, "FLAC"), "x.txt") == ("audio", "audio")
    assert detect_modality(encode(tone(16000, 0.5), 16000, "OGG", "VORBIS"), "") == ("audio", "audio")
    assert detect_modality(REPORT.encode(), "report.wav") == ("text", "text")
    assert detect_modality(sr_dataset("no effusion"), "r.txt") == ("text", "sr")
    ct = (Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm").read_bytes()
    assert detect_modality(ct, "a.wav") == ("image", "dicom")
    with pytest.raises(UnsupportedFormat):
        detect_modality(np.random.default_rng(0).bytes(4096), "notes.txt")
    assert not is_text(b"\x00\x01binary") and is_text("Befund: unauffällig".encode())


# ----------------------------------------------------------------------------- audio
@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_audio_windows_exact_at_every_rate(rate):
    data = encode(tone(rate, 5.0), rate)
    audio = decode_audio(data, target_rate=16000)
    assert audio.sample_rate == 16000 and audio.waveform.shape == (1, 80000)
    wins = split_windows(audio, window_s=2.0)
    assert [(w.start_s, w.end_s, w.padded) for w in wins] == [(0.0, 2.0, False), (2.0, 4.0, False), (4.0, 5.0, True)]
    assert all(w.samples.shape == (32000,) for w in wins) and not wins[-1].samples[16000:].any()
    assert [(w.start_s, w.end_s) for w in split_windows(audio, window_s=2.0, last="drop")] == [(0, 2), (2, 4)]
    assert [w.start_s for w in split_windows(audio, window_s=2.0, hop_s=1.0)] == [0.0, 1.0, 2.0, 3.0]


def test_audio_mixdown_and_formats():
    stereo = tone(16000, 1.0, channels=2)
    mean = decode_audio(encode(stereo, 16000), options=AudioOptions(mixdown="mean")).waveform
    np.testing.assert_allclose(mean[0], stereo.mean(axis=1), atol=1e-4)
    assert decode_audio(encode(stereo, 16000), options=AudioOptions(mixdown="all")).waveform.shape == (2, 16000)
    flac = decode_audio(encode(tone(16000, 1.0), 16000, "FLAC"))
    assert flac.metadata["audio_format"] == "FLAC" and flac.waveform.shape == (1, 16000)
    ogg = decode_audio(encode(tone(16000, 1.0), 16000, "OGG", "VORBIS"), target_rate=8000)
    assert ogg.sample_rate == 8000 and abs(ogg.waveform.shape[1] - 8000) < 200


def test_hostile_audio_is_refused_from_the_header():
    assert audio_header(lying_wav(36000)).duration_s == pytest.approx(36000)
    with pytest.raises(LimitExceeded, match="max_duration_s"):
        decode_audio(lying_wav(36000))
    with pytest.raises(LimitExceeded, match="max_sample_rate"):
        decode_audio(encode(tone(96000, 0.1), 96000), options=AudioOptions(max_sample_rate=48000))
    good = encode(tone(16000, 1.0), 16000)
    with pytest.raises(DecodeError):
        decode_audio(good[: len(good) // 2])  # truncated
    with pytest.raises(DecodeError):
        decode_audio(good[:30])  # header only


# ----------------------------------------------------------------------------- text
def test_text_chunks_cover_the_document(ckpts):
    enc = create_encoder(get_spec("hf_text", checkpoint=ckpts["text"]))
    tok = enc.preprocessor._tok
    ids = tok(REPORT, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = enc.chunk_text(REPORT, overlap=8)
    assert chunks.n_tokens == len(ids) > enc.max_length
    assert chunks.token_start[0] == 0 and chunks.token_end[-1] == len(ids)
    for k, (s, e) in enumerate(zip(chunks.token_start, chunks.token_end)):
        row_ids, mask = chunks.inputs[k]
        content = [i for i, m in zip(row_ids, mask) if m and i not in tok.all_special_ids]
        assert content == ids[s:e]
        if k:
            assert s == chunks.token_end[k - 1] - 8  # overlap exact
    with pytest.raises(Exception, match="overlap_tokens"):
        enc.chunk_text(REPORT, overlap=enc.max_length)


def test_sr_text_and_plain_text():
    ds = pydicom.dcmread(io.BytesIO(sr_dataset("small left effusion")))
    text = sr_text(ds)
    assert "Radiology Report" in text and "Finding: small left effusion" in text and "DOE" not in text
    assert decode_text(b"\xef\xbb\xbfa\r\nb") == "a\nb"
    with pytest.raises(DecodeError):
        decode_text(b"   \n")


# ----------------------------------------------------------------------------- parity
def test_audio_parity_with_plain_transformers(ckpts, tmp_path):
    import torch
    from transformers import AutoFeatureExtractor, AutoModel

    for key in ("audio", "hubert"):
        wav = tmp_path / f"{key}.wav"
        wav.write_bytes(encode(tone(44100, 4.5, channels=2), 44100))
        spec = get_spec("hf_audio", checkpoint=ckpts[key])
        rows = _run([str(wav)], {"audio": spec})
        windows = [r for r in rows if r["segment"] == "window"]
        assert [(r["start_s"], r["end_s"]) for r in windows] == [(0.0, 2.0), (2.0, 4.0), (4.0, 4.5)]
        # reference: soundfile + torchaudio resample + the checkpoint's own feature extractor and model
        import torchaudio.functional as AF

        samples, rate = sf.read(str(wav), dtype="float32", always_2d=True)
        mono = torch.from_numpy(samples.T.mean(axis=0, keepdims=True))
        wave = AF.resample(mono, rate, 16000)[0].numpy()
        fe = AutoFeatureExtractor.from_pretrained(ckpts[key])
        model = AutoModel.from_pretrained(ckpts[key]).eval()
        for r in windows:
            s = int(r["start_s"] * 16000)
            piece = np.pad(wave[s : s + 32000], (0, max(0, s + 32000 - len(wave))))
            x = fe(piece, sampling_rate=16000, return_tensors="pt")["input_values"]
            with torch.no_grad():
                ref = model(input_values=x).last_hidden_state.mean(dim=1)[0].numpy()
            np.testing.assert_allclose(r["embedding"], ref, atol=1e-5)
        pooled = [r for r in rows if r["segment"] == "pooled"]
        assert len(pooled) == 1 and pooled[0]["frame"] == -1 and pooled[0]["end_s"] == 4.5
        np.testing.assert_allclose(
            pooled[0]["embedding"], np.mean([r["embedding"] for r in windows], axis=0), atol=1e-6
        )


def test_text_parity_and_no_text_in_outputs(ckpts, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("Impression: no acute change.")
    long.write_text(REPORT)
    spec = get_spec("hf_text", checkpoint=ckpts["text"])
    rows = _run([str(short), str(long)], {"text": spec}, text={"overlap_tokens": 4})
    tok = AutoTokenizer.from_pretrained(ckpts["text"])
    model = AutoModel.from_pretrained(ckpts["text"]).eval()
    ref_in = tok("Impression: no acute change.", return_tensors="pt")
    with torch.no_grad():
        ref = model(**ref_in).last_hidden_state[:, 0][0].numpy()
    got = [r for r in rows if r["uri"] == str(short) and r["segment"] == "chunk"]
    assert len(got) == 1
    np.testing.assert_allclose(got[0]["embedding"], ref, atol=1e-5)
    # a long document: the chunk after the first is the tokenizer's own overflow encoding
    ref_in = tok(
        REPORT,
        truncation=True,
        max_length=64,
        stride=4,
        return_overflowing_tokens=True,
        padding="max_length",
        return_tensors="pt",
    )
    with torch.no_grad():
        refs = (
            model(input_ids=ref_in["input_ids"], attention_mask=ref_in["attention_mask"])
            .last_hidden_state[:, 0]
            .numpy()
        )
    chunks = [r for r in rows if r["uri"] == str(long) and r["segment"] == "chunk"]
    assert len(chunks) == len(refs) > 2
    for r, ref in zip(chunks, refs):
        np.testing.assert_allclose(r["embedding"], ref, atol=1e-5)
    meta = json.loads(chunks[0]["metadata"])
    assert meta["text_chars"] == len(REPORT) and len(meta["text_sha256"]) == 64
    blob = json.dumps([{k: v for k, v in r.items() if k != "embedding"} for r in rows], default=str)
    assert "Impression" not in blob and "effusion" not in blob


def test_mixed_batch_routes_skips_and_quarantines(ckpts, tmp_path):
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    wav, txt, bad = tmp_path / "a.wav", tmp_path / "r.txt", tmp_path / "hours.wav"
    wav.write_bytes(encode(tone(8000, 3.0), 8000))
    txt.write_text(REPORT)
    bad.write_bytes(lying_wav(36000))
    specs = {
        "image": get_spec("hf_image", checkpoint=ckpts["image"]),
        "audio": get_spec("hf_audio", checkpoint=ckpts["audio"]),
    }
    rows = _run([str(ct), str(wav), str(txt), str(bad)], specs)
    by = {}
    for r in rows:
        by.setdefault(Path(r["uri"]).name, []).append(r)
    assert [r["segment"] for r in by["CT_small.dcm"]] == ["frame"] and by["CT_small.dcm"][0]["route"] == "image"
    assert [r["segment"] for r in by["a.wav"]] == ["window", "window", "pooled"]
    assert by["r.txt"][0]["status"] == "skipped" and by["r.txt"][0]["route"] == "text"
    assert by["hours.wav"][0]["status"] == "error" and by["hours.wav"][0]["error_class"] == "LimitExceeded"


def _run(uris, specs, **opts):
    first = next(iter(specs.values()))
    stage = StageOptions(encoder_spec=first, encoder_specs=specs, salt="s", **opts)
    table = pa.Table.from_pylist([{"uri": u, "member": ""} for u in uris])
    decoded = decode_batch(read_batch(table, stage), stage)
    actor = EncoderActor(
        spec_to_dict(first),
        device="cpu",
        batch_size=4,
        provenance={"encoder": "x"},
        specs={m: spec_to_dict(s) for m, s in specs.items()},
    )
    return actor(decoded).to_pylist()


def test_non_image_dicom_routes_to_other_and_truncated_image_does_not(tmp_path):
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medray.platform.formats import detect_modality
    from medray.testing.samples import generate_samples

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert detect_modality(buf.getvalue(), "rs.dcm")[0] == "other"
    info = generate_samples(str(tmp_path / "s"), n=8)
    truncated = (tmp_path / "s" / info["hostile"]["truncated"]).read_bytes()
    assert detect_modality(truncated, "t.dcm")[0] == "image"
    dx = (tmp_path / "s" / info["dicom"][0]).read_bytes()
    assert detect_modality(dx, "x.dcm") == ("image", "dicom")
