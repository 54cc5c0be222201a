"""Record-level fine-tuning pieces without Ray: the ``data`` config group, ``data.features``,
pooled-embedding examples, slide pooling, quarantine rows, the head-only model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from medray.config import CONF_DIR, register_schemas
from medray.jobs.finetune import FinetuneJob, register
from medray.jobs.finetune.data import ExampleSpec, QuarantineTarget, SplitPlan, examples_batch, write_quarantine
from medray.jobs.finetune.features import embed_output_rows, embedding_examples_batch, pool_tiles
from medray.platform.errors import ConfigError
from medray.platform.records import QUARANTINE_SCHEMA, record_id
from medray.platform.splits import SplitFractions

DATA_PRESETS = sorted(p.stem for p in Path(CONF_DIR, "data").glob("*.yaml"))


@pytest.fixture
def manifest(tmp_path):
    rows = [
        {
            "uri": f"/data/{p}_{j}.wav",
            "patient": f"P{p}",
            "high": (p + j) % 2,
            "site": "AB"[p % 2],
            "report": f"report {p} {j}",
        }
        for p in range(20)
        for j in range(2)
    ]
    path = tmp_path / "labels.csv"
    pcsv.write_csv(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def compose_ft(tmp_path, manifest):
    register_schemas()
    register()

    def _compose(*overrides: str, data: str | None = None):
        base = [f"output={tmp_path / 'out'}", "encoder.checkpoint=/models/x", "task.labels=[high]"]
        if data is None:
            base += [f"data.train={manifest}", "data.group_by=patient"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("finetune", overrides=[*base, *overrides] + ([f"data={data}"] if data else []))

    return _compose


# --------------------------------------------------------------------------
# config: the data group and data.features
# --------------------------------------------------------------------------
def test_data_is_a_config_group_and_every_data_key_still_overrides(compose_ft):
    assert {"manifest", "cxr_phantoms", "audio_tones", "report_keywords"} <= set(DATA_PRESETS)
    cfg = compose_ft("data.val_fraction=0.3", "data.seed=4", "data.cache=false", "data.shuffle_buffer=0")
    assert cfg.data.val_fraction == 0.3 and cfg.data.seed == 4 and str(cfg.data.cache).lower() == "false"
    assert cfg.data.group_by == "patient" and cfg.data.features == "auto" and cfg.data.embeddings is None
    assert cfg.data.decode_batch_size == 16 and cfg.data.read_batch_size == 16


@pytest.mark.parametrize("preset", ["audio_tones", "report_keywords", "cxr_phantoms"])
def test_data_presets_compose(compose_ft, preset, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDRAY_HOME", str(tmp_path / "home"))
    cfg = compose_ft(data=preset)
    assert cfg.data.train.startswith(str(tmp_path / "home") + "/samples/")
    assert cfg.data.decode_batch_size == 16  # the schema's defaults fill what a preset leaves out


def test_experiment_still_sets_data_keys(compose_ft):
    cfg = compose_ft("experiment=cxr_lesion_tiny")
    assert cfg.data.val_fraction == 0.25 and cfg.data.group_by == "patient"  # the command line wins


@pytest.mark.parametrize(
    ("overrides", "features"),
    [
        (["encoder=hf_image", "train=full"], "inputs"),
        (["encoder=hf_image", "train=linear_probe"], "inputs"),
        (["encoder=hf_image", "train=linear_probe", "data.features=embeddings"], "embeddings"),
        (["encoder=hf_audio", "train=linear_probe"], "embeddings"),
        (["encoder=hf_text", "train=linear_probe", "data.text_column=report"], "embeddings"),
    ],
)
def test_features_resolve(compose_ft, overrides, features):
    job = FinetuneJob(compose_ft(*overrides))
    assert job.features == features


def test_auto_features_train_slides_on_pooled_tile_embeddings(tmp_path, compose_ft):
    """A manifest of whole slides (judged by content, not the name) trains on mean tile embeddings."""
    from medray.testing.media import slide_tiff

    data = slide_tiff(size=256, levels=2)
    rows = []
    for i in range(20):
        (tmp_path / f"{i}.bin").write_bytes(data)
        rows.append({"uri": str(tmp_path / f"{i}.bin"), "high": i % 2, "patient": f"P{i}"})
    slides = tmp_path / "slides.csv"
    pcsv.write_csv(pa.Table.from_pylist(rows), slides)
    job = FinetuneJob(compose_ft("encoder=hf_image", "train=linear_probe", f"data.train={slides}"))
    assert job.features == "embeddings"
    with pytest.raises(ConfigError) as err:  # end to end on slides is not offered: the key says what to change
        FinetuneJob(compose_ft("encoder=hf_image", "train=full", f"data.train={slides}"))
    assert err.value.key == "train.strategy"
    assert FinetuneJob(compose_ft("encoder=hf_image", "train=linear_probe")).features == "inputs"  # WAV paths


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["encoder=hf_audio"], "train.strategy"),  # train=full on pooled embeddings
        (["encoder=hf_audio", "train=lora"], "train.strategy"),
        (["encoder=hf_audio", "train=linear_probe", "data.features=inputs"], "data.features"),
        (["encoder=hf_image", "data.features=pixels"], "data.features"),
        (["encoder=hf_image", "data.text_column=report"], "data.text_column"),  # inputs: no documents
        (["encoder=hf_audio", "train=linear_probe", "data.text_column=report"], "data.text_column"),
        (["encoder=hf_text", "train=linear_probe", "data.text_column=nope"], "data.text_column"),
        (["encoder=hf_audio", "train=linear_probe", "audio.pool=none"], "audio.pool"),
        (["encoder=hf_audio", "train=linear_probe", "audio.mixdown=all"], "audio.mixdown"),
        (["encoder=hf_audio", "train=linear_probe", "+train.augment={default: {noise: 0.1}}"], "train.augment"),
        (["encoder=hf_audio", "train=linear_probe", "data.encode_actors=0"], "data.encode_actors"),
        (["encoder=hf_audio", "train=linear_probe", "data.embeddings=/nowhere/emb"], "data.embeddings"),
    ],
)
def test_bad_record_level_settings_name_the_key(compose_ft, overrides, key):
    with pytest.raises(ConfigError) as err:
        FinetuneJob(compose_ft(*overrides))
    assert err.value.key == key, str(err.value)


def test_documents_from_a_column_need_no_uri(tmp_path, compose_ft):
    rows = [{"report": f"text {i}", "patient": f"P{i // 2}", "high": i % 2} for i in range(40)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    job = FinetuneJob(
        compose_ft("encoder=hf_text", "train=linear_probe", f"data.train={path}", "data.text_column=report")
    )
    assert job.features == "embeddings" and job.counts["train"]["usable"] + job.counts["val"]["usable"] == 40


# --------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------
SPEC = ExampleSpec(task="binary", labels=("high",), label_columns=("high",), subgroups=("site",))


def _encoder_rows() -> pa.Table:
    """What EncoderActor emits for: an audio record (2 windows + pooled), a failed record, a skipped
    one, a slide's 2 tiles, an image with 2 frames."""

    def row(uri, seg, frame, emb, status="ok", member="", high=1, **kw):
        return {
            "uri": uri,
            "member": member,
            "record_id": record_id(uri, member),
            "segment": seg,
            "frame": frame,
            "embedding": emb,
            "status": status,
            "stage": kw.get("stage"),
            "error_class": kw.get("error_class"),
            "message": kw.get("message"),
            "modality": kw.get("modality", "audio"),
            "patient_key": None,
            "metadata": json.dumps({}),
            "high": high,
            "site": "A",
        }

    return pa.Table.from_pylist(
        [
            row("a.wav", "window", 0, [1.0, 1.0]),
            row("a.wav", "window", 1, [3.0, 3.0]),
            row("a.wav", "pooled", -1, [2.0, 2.0]),
            row(
                "bad.wav",
                None,
                None,
                None,
                status="error",
                stage="decode",
                error_class="DecodeError",
                message="truncated WAV",
            ),
            row(
                "note.txt",
                None,
                None,
                None,
                status="skipped",
                stage="route",
                error_class="NoEncoder",
                message="no encoder for 'text'",
            ),
            row("s.tiff", "tile", 0, [0.0, 4.0], modality="slide", high=0),
            row("s.tiff", "tile", 1, [2.0, 0.0], modality="slide", high=0),
            row("i.dcm", "frame", 0, [5.0, 5.0], modality="CT"),
            row("i.dcm", "frame", 1, [6.0, 6.0], modality="CT"),
            row("nolabel.wav", "pooled", -1, [1.0, 0.0], high=None),
        ]
    )


def test_embedding_examples_keep_record_rows_and_quarantine_the_rest(tmp_path):
    target = QuarantineTarget(str(tmp_path / "out"), {}, "test")
    plan = SplitPlan("patient_key", seed=0, fractions=SplitFractions(val=0.5), salt="s")
    ex = embedding_examples_batch(_encoder_rows(), SPEC, plan, target).to_pylist()
    got = [(r["uri"], r["frame"], r["pool"], np.frombuffer(r["x"], np.float32).tolist()) for r in ex]
    assert got == [
        ("a.wav", -1, "", [2.0, 2.0]),
        ("s.tiff", -1, "tile", [0.0, 4.0]),
        ("s.tiff", -1, "tile", [2.0, 0.0]),
        ("i.dcm", 0, "", [5.0, 5.0]),
        ("i.dcm", 1, "", [6.0, 6.0]),
    ]
    assert {r["record_id"] for r in ex if r["uri"] == "s.tiff"} == {record_id("s.tiff", "")}  # the slide's own id
    assert len({r["split"] for r in ex if r["uri"] == "s.tiff"}) == 1 and all(r["sg_site"] == "A" for r in ex)
    assert [r["y"] for r in ex] == [[1.0], [0.0], [0.0], [1.0], [1.0]]
    q = pq.read_table(tmp_path / "out" / "quarantine")
    assert q.schema.equals(QUARANTINE_SCHEMA, check_metadata=False)
    assert sorted((r["uri"], r["error_class"], r["stage"]) for r in q.to_pylist()) == [
        ("bad.wav", "DecodeError", "decode"),
        ("note.txt", "NoEncoder", "route"),
    ]


def test_quarantine_parts_are_named_by_their_records(tmp_path):
    target = QuarantineTarget(str(tmp_path / "out"), {}, "test")
    rows = _encoder_rows()
    assert write_quarantine(rows, target) == 2 and write_quarantine(rows, target) == 2  # a second epoch
    assert len(list((tmp_path / "out" / "quarantine").glob("*.parquet"))) == 1
    assert write_quarantine(rows.slice(0, 3), target) == 0 and write_quarantine(rows, None) == 0


def test_image_examples_quarantine_decode_failures(tmp_path):
    """The end-to-end (inputs) path: a record that failed to decode becomes a quarantine row too."""
    spec = ExampleSpec(task="binary", labels=("high",), label_columns=("high",))
    table = pa.table(
        {
            "uri": ["x.dcm", "y.dcm"],
            "member": ["", ""],
            "record_id": ["r1", "r2"],
            "status": ["ok", "error"],
            "stage": [None, "decode"],
            "error_class": [None, "DecodeError"],
            "message": [None, "pixel data truncated"],
            "pixel_values": [np.zeros(3, np.float32).tobytes(), None],
            "pixel_shape": [[1, 3, 1, 1], None],
            "frames": [[0], None],
            "modality": ["CT", None],
            "metadata": ["{}", None],
            "high": [1, 0],
        }
    )
    out = examples_batch(table, spec, None, QuarantineTarget(str(tmp_path / "o"), {}, "t"))
    assert out.column("record_id").to_pylist() == ["r1"]
    q = pq.read_table(tmp_path / "o" / "quarantine").to_pylist()
    assert [(r["record_id"], r["message"]) for r in q] == [("r2", "pixel data truncated")]


def test_pool_tiles_means_a_slides_tiles_and_passes_other_records():
    ex = embedding_examples_batch(_encoder_rows(), SPEC, None, None)
    ids = ex.column("record_id").to_pylist()
    slide = pool_tiles(ex.filter(pa.array([u == "s.tiff" for u in ex.column("uri").to_pylist()])))
    assert slide.num_rows == 1 and np.frombuffer(slide.column("x")[0].as_py(), np.float32).tolist() == [1.0, 2.0]
    assert slide.column("pool").to_pylist() == ["slide"] and slide.column("frame").to_pylist() == [-1]
    image = ex.filter(pa.array([i == record_id("i.dcm", "") for i in ids]))
    assert pool_tiles(image).equals(image)


def test_embed_output_rows_keep_this_encoders_records():
    t = pa.Table.from_pylist(
        [
            {
                "uri": "a.wav",
                "member": "",
                "frame": 0,
                "segment": "window",
                "embedding": [1.0],
                "weights_hash": "h",
                "modality": "audio",
                "patient_key": None,
                "metadata": "{}",
                "high": 0,
            },
            {
                "uri": "a.wav",
                "member": "",
                "frame": -1,
                "segment": "pooled",
                "embedding": [2.0],
                "weights_hash": "h",
                "modality": "audio",
                "patient_key": None,
                "metadata": "{}",
                "high": 0,
            },
            {
                "uri": "b.wav",
                "member": "",
                "frame": -1,
                "segment": "pooled",
                "embedding": [3.0],
                "weights_hash": "other",
                "modality": "audio",
                "patient_key": None,
                "metadata": "{}",
                "high": 1,
            },
            {
                "uri": "c.dcm",
                "member": None,
                "frame": 0,
                "segment": "frame",
                "embedding": [4.0],
                "weights_hash": "h",
                "modality": "CT",
                "patient_key": "k",
                "metadata": "{}",
                "high": 1,
            },
        ]
    )
    out = embed_output_rows(t, "h")
    assert [(r["uri"], r["member"], r["segment"]) for r in out.to_pylist()] == [
        ("a.wav", "", "pooled"),
        ("c.dcm", "", "frame"),
    ]
    assert "high" not in out.column_names and set(out.column("status").to_pylist()) == {"ok"}


def test_head_only_model_names_its_weights_like_the_classifier():
    import torch

    from medray.jobs.finetune.model import EmbeddingHead, build_classifier

    model, tuner, encoder = build_classifier(
        {}, n_outputs=3, strategy="linear_probe", lora={}, seed=1, input_shape=[8], embedding_dim=8
    )
    assert isinstance(model, EmbeddingHead) and tuner is None and encoder is None
    assert sorted(n for n, _ in model.named_parameters()) == ["head.bias", "head.weight"]
    again, _, _ = build_classifier(
        {}, n_outputs=3, strategy="linear_probe", lora={}, seed=1, input_shape=[8], embedding_dim=8
    )
    assert torch.equal(model.head.weight, again.head.weight)  # seeded: identical on every rank
    assert model(torch.zeros(4, 8)).shape == (4, 3)


def test_head_standardises_and_folds_into_one_linear_map_on_raw_embeddings():
    import torch

    from medray.encoders.heads import LinearHead
    from medray.jobs.finetune.model import build_classifier, feature_stats

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(50, 6)) * [0.01, 0.1, 1, 10, 0.5, 2] + [5, -1, 0, 3, 0.2, 1]).astype(np.float32)
    batches = [{"x": [r.tobytes() for r in x[:20]]}, {"x": [r.tobytes() for r in x[20:]]}]
    mean, std = feature_stats(iter(batches))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-4)
    model, _, _ = build_classifier(
        {},
        n_outputs=2,
        strategy="linear_probe",
        lora={},
        seed=0,
        input_shape=[6],
        embedding_dim=6,
        embedding_stats={"mean": mean, "std": std},
    )
    with torch.no_grad():
        z = model(torch.from_numpy(x)).numpy()
    head = LinearHead(*model.linear_weights(), "multilabel")
    np.testing.assert_allclose(head.logits(x), z, atol=1e-4)
    assert sorted(n for n, _ in model.named_parameters()) == ["head.bias", "head.weight"]  # stats are fixed


def test_join_of_an_embed_output_with_the_manifest_by_record(tmp_path):
    """``data.embeddings``: union + groupby(key) + join_examples, one group at a time as Ray would."""
    from medray.jobs.finetune.features import join_examples, keyed_rows

    emb = embed_output_rows(
        pa.Table.from_pylist(
            [
                {
                    "uri": "a.wav",
                    "member": "",
                    "frame": -1,
                    "segment": "pooled",
                    "embedding": [1.0, 2.0],
                    "weights_hash": "h",
                    "modality": "audio",
                    "patient_key": None,
                    "metadata": "{}",
                    "high": 0,
                },  # the embed run's copy: ignored
                {
                    "uri": "z.wav",
                    "member": "",
                    "frame": -1,
                    "segment": "pooled",
                    "embedding": [9.0, 9.0],
                    "weights_hash": "h",
                    "modality": "audio",
                    "patient_key": None,
                    "metadata": "{}",
                    "high": 0,
                },  # not in this manifest
            ]
        ),
        "h",
    )
    manifest = pa.Table.from_pylist(
        [
            {"uri": "a.wav", "member": "", "high": 1, "site": "A", "split": "val"},
            {"uri": "gone.wav", "member": "", "high": 0, "site": "B", "split": "train"},
        ]
    )
    union = pa.concat_tables([keyed_rows(emb, "e"), keyed_rows(manifest, "m")])
    target = QuarantineTarget(str(tmp_path / "out"), {}, "t")
    out = []
    for key in sorted(set(union.column("key").to_pylist())):
        group = union.filter(pa.array([k == key for k in union.column("key").to_pylist()]))
        part = join_examples(group, SPEC, None, target)
        assert part.schema.names == [
            "x",
            "y",
            "record_id",
            "frame",
            "modality",
            "pool",
            "uri",
            "member",
            "split",
            "sg_site",
        ]  # every group, even an empty one, has the same columns
        out += part.to_pylist()
    assert [(r["uri"], r["y"], r["split"], r["sg_site"], np.frombuffer(r["x"], np.float32).tolist()) for r in out] == [
        ("a.wav", [1.0], "val", "A", [1.0, 2.0])
    ]
    q = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    assert [(r["uri"], r["error_class"], r["stage"]) for r in q] == [("gone.wav", "MissingEmbedding", "join")]
