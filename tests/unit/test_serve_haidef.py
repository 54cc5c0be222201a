"""HAI-DEF's serving format without Ray: instance parsing, answers against the schema, windows and patches."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from medray.platform.errors import DecodeError, ReadError
from medray.serve.config import uri_allowed
from medray.serve.encoder import DecodeSettings, decode_input
from medray.serve.haidef import (
    INSTANCE_SCHEMA,
    PREDICTION_SCHEMA,
    InstanceError,
    ParsedInstance,
    check_against,
    instance_error,
    parse_instances,
    prediction,
)

_STORE = "https://pacs.example.org/dicom-web"
_SOP = f"{_STORE}/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"


def _png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _parse(*instances):
    return parse_instances({"instances": list(instances)}, patch_size=224, max_instances=8)


def test_each_source_becomes_the_encoder_payload():
    png = _png()
    got = _parse(
        {"image": {"input_bytes": base64.b64encode(png).decode()}},
        {"image": {"dicomweb_uri": _SOP, "access_credential": "tok-1.2_3"}},
        {"image": {"gcs_uri": "gs://b/cxr/1.png"}},
        {"image": {"s3_uri": "s3://b/cxr/1.dcm", "radiology_dicom_window_level": {"center": 40, "width": 400}}},
        {"image": {"image_url": "https://img.example.org/a.png"}},
        {"text": "no pleural effusion"},
    )
    assert all(isinstance(p, ParsedInstance) for p in got), got
    assert got[0].payload == {"data": png, "name": ""}
    assert got[1].payload == {"dicomweb_uri": _SOP, "credential": "tok-1.2_3"} and got[1].source == "dicomweb_uri"
    assert got[2].payload == {"uri": "gs://b/cxr/1.png"}
    assert got[3].payload == {"uri": "s3://b/cxr/1.dcm", "window": (40.0, 400.0)}
    assert got[4].payload == {"url": "https://img.example.org/a.png", "credential": None}
    assert got[5].payload == {"data": b"no pleural effusion", "name": "input.txt"} and got[5].input_type == "text"
    for instance in (
        {"image": {"dicomweb_uri": _SOP, "access_credential": "t"}},
        {"image": {"s3_uri": "s3://b/x.dcm", "patch_coordinates_list": [{"x_origin": 0, "y_origin": 0}]}},
        {"text": "x"},
    ):
        assert check_against(INSTANCE_SCHEMA, instance) == []


@pytest.mark.parametrize(
    "instance,needle",
    [
        ({"image": {}}, "exactly one of"),
        ({"image": {"input_bytes": "aGk=", "gcs_uri": "gs://b/x.png"}}, "exactly one of"),
        ({"image": {"input_bytes": "not base64!"}}, "base64"),
        ({"image": {"input_bytes": "aGk=", "access_credential": "t"}}, "input_bytes"),
        ({"image": {"dicomweb_uri": f"{_STORE}/studies/1.2"}}, "instances/<uid>"),
        ({"image": {"dicomweb_uri": _SOP, "access_credential": "bad token!"}}, "bearer token"),
        ({"image": {"gcs_uri": "gs://bucket-only"}}, "gs://"),
        ({"image": {"s3_uri": "s3://b/x.png", "radiology_dicom_window_level": {"center": 1}}}, "center and width"),
        ({"image": {"s3_uri": "s3://b/x.png", "radiology_dicom_window_level": {"center": 1, "width": 0}}}, ">= 1"),
        ({"image": {"s3_uri": "s3://b/x.png", "patch_coordinates_list": []}}, "non-empty"),
        ({"image": {"s3_uri": "s3://b/x.png", "patch_coordinates_list": [{"x_origin": -1, "y_origin": 0}]}}, ">= 0"),
        ({"image": {"s3_uri": "s3://b/x.png", "openslide_pyramid_level": {"index": 0}}}, "not supported"),
        ({"image": {"s3_uri": "s3://b/x.png", "colour": 1}}, "unknown image field"),
        ({"image": {"s3_uri": "s3://b/x.png"}, "text": "both"}, "exactly one of"),
        ({"text": "   "}, "non-empty"),
        ("a string", "object"),
    ],
)
def test_a_bad_instance_is_its_own_error_and_the_others_go_on(instance, needle):
    got = _parse({"text": "fine"}, instance)
    assert isinstance(got[0], ParsedInstance)
    assert isinstance(got[1], InstanceError) and needle in str(got[1])
    answer = instance_error(got[1].code, str(got[1]))
    assert check_against(PREDICTION_SCHEMA, answer) == []
    if needle != "not supported":  # what HAI-DEF's schema refuses, medray refuses (it is stricter on some)
        assert check_against(INSTANCE_SCHEMA, instance) != [] or needle in ("base64", "non-empty")


def test_the_request_as_a_whole():
    for doc in ({}, {"instances": []}, {"instances": {}}, [], {"instances": [{"text": "a"}], "extra": 1}):
        with pytest.raises(InstanceError):
            parse_instances(doc, patch_size=224, max_instances=8)
    patches = [{"x_origin": i, "y_origin": 0} for i in range(5)]
    with pytest.raises(InstanceError, match="max_instances=8") as err:
        _parse({"image": {"s3_uri": "s3://b/x.png", "patch_coordinates_list": patches}}, *[{"text": "a"}] * 4)
    assert err.value.code == "too_large"
    parsed = _parse({"image": {"s3_uri": "s3://b/x.png", "patch_coordinates_list": patches[:2]}})[0]
    assert isinstance(parsed, ParsedInstance)
    assert parsed.patches == [(0, 0, 224, 224), (1, 0, 224, 224)] and parsed.payload["patches"] == parsed.patches


def test_answers_follow_the_prediction_schema():
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    image = ParsedInstance({"data": b"x"}, "image")
    one = prediction({"embeddings": emb[:1], "frames": [0]}, image)
    assert one == {"input_type": "image", "embedding": [0.0, 1.0, 2.0, 3.0]}
    many = prediction({"embeddings": emb, "frames": [0, 1, 2]}, image)  # a multi-frame object: the mean
    assert many["embedding"] == [4.0, 5.0, 6.0, 7.0]
    text = ParsedInstance({"data": b"x"}, "text")
    pooled = prediction({"embeddings": emb, "frames": [0, 1, 2], "pooled": {"embedding": emb[2]}}, text)
    assert pooled == {"input_type": "text", "embedding": [8.0, 9.0, 10.0, 11.0]}
    patched = ParsedInstance({"data": b"x"}, "image", patches=[(0, 0, 8, 8), (8, 0, 8, 8)])
    siglip = {"embeddings": emb[:2], "frames": [0, 1], "encoder": {"model_temperature": 4.7, "model_bias": -10.0}}
    answer = prediction(siglip, patched)
    assert [p["patch_coordinate"] for p in answer["patch_embeddings"]] == [
        {"x_origin": 0, "y_origin": 0, "width": 8, "height": 8},
        {"x_origin": 8, "y_origin": 0, "width": 8, "height": 8},
    ]
    assert answer["model_temperature"] == 4.7 and answer["model_bias"] == -10.0
    for doc in (one, many, pooled, answer, instance_error("too_large", "x" * 5000)):
        assert check_against(PREDICTION_SCHEMA, doc) == [], doc
    assert check_against(PREDICTION_SCHEMA, {"embedding": [1.0]}) != []  # input_type is required
    assert check_against(PREDICTION_SCHEMA, {**one, "error": {"description": "x"}}) != []


def test_web_prefixes():
    prefixes = ["https://pacs.example.org/dicom-web/", "s3://b/cxr/"]
    assert uri_allowed(_SOP, prefixes)
    assert uri_allowed("dicomweb+" + _SOP, prefixes)
    assert uri_allowed(_SOP, ["dicomweb+https://pacs.example.org/dicom-web"])
    for uri in (
        "https://pacs.example.org/dicom-web-evil/studies/1/series/2/instances/3",
        "https://pacs.example.org/dicom-web/../admin",
        "https://pacs.example.org/dicom-web/%2e%2e/admin",
        "https://pacs.example.org/dicom-web/x?redirect=http://evil",
        "https://pacs.example.org/dicom-web/x#f",
        "http://pacs.example.org/dicom-web/studies/1/series/2/instances/3",  # another scheme
        "https://pacs.example.org@evil.org/dicom-web/x",
        "file:///etc/passwd",
    ):
        assert not uri_allowed(uri, prefixes), uri


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    from medray.encoders import build_tiny_checkpoint, create_preprocessor, get_spec

    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path_factory.mktemp("ckpt")), arch="vit", image_size=32)
    return create_preprocessor(get_spec("hf_image", checkpoint=ckpt))


def test_patches_are_crops_of_the_image_as_shown(pre):
    png = _png(64, 48)
    got = decode_input({"data": png, "patches": [(0, 0, 32, 32), (32, 16, 32, 32)]}, DecodeSettings(), pre)
    assert got.pixels.shape == (2, 3, 32, 32) and got.frames == [0, 1]
    whole = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(got.pixels[1], pre.preprocess([whole[16:48, 32:64]])[0])
    with pytest.raises(DecodeError, match="outside the 64x48 image"):
        decode_input({"data": png, "patches": [(40, 0, 32, 32)]}, DecodeSettings(), pre)


def test_the_callers_window_wins_over_the_files(pre, tmp_path):
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    default = decode_input({"data": data}, DecodeSettings(), pre).pixels
    narrow = decode_input({"data": data, "window": (40.0, 80.0)}, DecodeSettings(), pre).pixels
    again = decode_input({"data": data, "window": (40.0, 80.0)}, DecodeSettings(), pre).pixels
    assert not np.allclose(default, narrow) and np.array_equal(narrow, again)


def test_web_sources_obey_the_prefixes(pre):
    settings = DecodeSettings(allowed_uri_prefixes=("https://pacs.example.org/dicom-web/",))
    with pytest.raises(ReadError, match="allowed prefix"):
        decode_input({"dicomweb_uri": _SOP.replace("pacs.", "evil."), "credential": None}, settings, pre)
    with pytest.raises(ReadError, match="allowed prefix"):
        decode_input({"url": "https://img.example.org/a.png"}, settings, pre)
