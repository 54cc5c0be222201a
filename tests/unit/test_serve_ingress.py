"""The serving path without Ray: limits, input parsing, auth, error mapping, decode parity with the batch job."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from medray.platform.errors import DecodeError, EncodeError, LimitExceeded, ReadError, UnsupportedFormat
from medray.serve.encoder import DecodeSettings, decode_input, error_result
from medray.serve.heads import HeadRefused, check_head_card
from medray.serve.ingress import (
    ApiError,
    IngressSettings,
    check_bearer,
    error_for_exception,
    error_for_result,
    load_token,
    parse_input,
    read_body,
)


def _request(headers: dict, chunks: list[bytes] | None = None, *, explode: bool = False):
    """A Starlette request whose body arrives in ``chunks`` (or fails the test when read)."""
    from starlette.requests import Request

    pending = list(chunks or [b""])

    async def receive():
        if explode:
            raise AssertionError("the body was read")
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/embeddings",
        "query_string": b"",
        "headers": [(k.lower().encode(), str(v).encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


def _run(coro):
    return asyncio.run(coro)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ body limits
def test_content_length_over_the_limit_is_refused_before_reading():
    with pytest.raises(ApiError) as err:
        _run(read_body(_request({"content-length": 10_000}, explode=True), limit=100))
    assert (err.value.status, err.value.code) == (413, "too_large")


def test_streamed_body_over_the_limit_is_refused_while_streaming():
    with pytest.raises(ApiError) as err:
        _run(read_body(_request({}, [b"x" * 60, b"x" * 60, b"x" * 60]), limit=100))
    assert err.value.status == 413
    assert _run(read_body(_request({}, [b"ab", b"cd"]), limit=100)) == b"abcd"


def test_bad_content_length_is_a_400():
    with pytest.raises(ApiError) as err:
        _run(read_body(_request({"content-length": "many"}), limit=100))
    assert err.value.status == 400


# ------------------------------------------------------------------------------ inputs
def test_multipart_json_and_raw_inputs():
    png = _png()
    s = IngressSettings(allowed_uri_prefixes=["s3://b/cxr/"])
    boundary = "XyZ"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    got = _run(parse_input(f"multipart/form-data; boundary={boundary}", body, s))
    assert got["data"] == png
    got = _run(parse_input("application/json", json.dumps({"bytes_b64": base64.b64encode(png).decode()}).encode(), s))
    assert got["data"] == png
    assert _run(parse_input("application/json", b'{"uri": "s3://b/cxr/1.dcm"}', s)) == {"uri": "s3://b/cxr/1.dcm"}
    assert _run(parse_input("image/png", png, s))["data"] == png
    assert _run(parse_input("application/json", b'{"text": "No effusion."}', s)) == {
        "data": b"No effusion.",
        "name": "input.txt",
    }
    assert _run(parse_input("text/plain; charset=utf-8", b"No effusion.", s))["name"] == "input.txt"
    assert _run(parse_input("audio/wav", b"RIFF....WAVE", s))["name"] == "input.wav"


@pytest.mark.parametrize(
    "ctype,body,status,code",
    [
        ("text/html", b"x", 415, "unsupported_media"),
        ("", b"x", 415, "unsupported_media"),
        ("application/json", b'{"text": ""}', 422, "invalid_request"),
        ("application/json", b'{"text": "a", "uri": "s3://b/cxr/x"}', 422, "invalid_request"),
        ("application/json", b"{", 422, "invalid_request"),
        ("application/json", b'{"bytes_b64": "%%%"}', 422, "invalid_request"),
        ("application/json", b'{"bytes_b64": "aGk=", "uri": "s3://b/cxr/x"}', 422, "invalid_request"),
        ("application/json", b'{"uri": "s3://b/other/x"}', 403, "uri_not_allowed"),
        ("application/json", b'{"uri": "/etc/passwd"}', 403, "uri_not_allowed"),
        (
            "multipart/form-data; boundary=B",
            b'--B\r\nContent-Disposition: form-data; name="n"\r\n\r\nv\r\n--B--\r\n',
            422,
            "invalid_request",
        ),
        ("multipart/form-data", b"garbage", 422, "invalid_request"),
        ("image/png", b"", 422, "invalid_request"),
    ],
)
def test_malformed_inputs_answer_4xx(ctype, body, status, code):
    with pytest.raises(ApiError) as err:
        _run(parse_input(ctype, body, IngressSettings(allowed_uri_prefixes=["s3://b/cxr/"])))
    assert (err.value.status, err.value.code) == (status, code)


# ------------------------------------------------------------------------------ auth
def test_bearer_token_checks(tmp_path, monkeypatch):
    check_bearer(None, None)  # auth off
    check_bearer("Bearer s3cret", "s3cret")
    check_bearer("bearer s3cret", "s3cret")
    for header in (None, "", "s3cret", "Basic s3cret", "Bearer wrong", "Bearer "):
        with pytest.raises(ApiError) as err:
            check_bearer(header, "s3cret")
        assert err.value.status == 401 and "WWW-Authenticate" in err.value.headers


def test_token_from_file_or_env_and_fail_closed(tmp_path, monkeypatch):
    assert load_token(IngressSettings(auth_enabled=False)) is None
    monkeypatch.setenv("MY_TOKEN", " t1 \n")
    assert load_token(IngressSettings(auth_enabled=True, token_env="MY_TOKEN")) == "t1"
    (tmp_path / "tok").write_text("t2\n")
    assert (
        load_token(IngressSettings(auth_enabled=True, token_env="MY_TOKEN", token_file=str(tmp_path / "tok"))) == "t2"
    )
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(RuntimeError):
        load_token(IngressSettings(auth_enabled=True, token_env="MY_TOKEN"))


# ------------------------------------------------------------------------------ error mapping
@pytest.mark.parametrize(
    "err,status,code",
    [
        (UnsupportedFormat("neither DICOM nor image"), 415, "unsupported_media"),
        (LimitExceeded("too many pixels"), 413, "too_large"),
        (DecodeError("truncated"), 422, "undecodable"),
        (ReadError("object not found"), 422, "unreadable"),
        (EncodeError("non-finite"), 422, "unencodable"),
    ],
)
def test_record_errors_map_to_4xx(err, status, code):
    api = error_for_result(error_result(err))
    assert (api.status, api.code, api.message) == (status, code, str(err))


def test_unexpected_decoder_exceptions_keep_no_message():
    res = error_result(ValueError("PatientName=Doe^John"))
    assert "Doe" not in json.dumps(res) and error_for_result(res).status == 422


def test_head_errors_and_handle_failures_map():
    assert error_for_result({"error": {"class": "UnknownHead", "message": "x"}}).status == 404
    assert error_for_result({"error": {"class": "HeadRefused", "message": "x"}}).status == 409
    assert error_for_result({"embeddings": []}) is None
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    e = error_for_exception(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert (e.status, e.code, e.headers.get("Retry-After")) == (503, "overloaded", "1")
    assert error_for_exception(asyncio.TimeoutError()).status == 504
    assert error_for_exception(RayActorError()).status == 503
    e = error_for_exception(KeyError("secret value"))
    assert (e.status, e.code) == (503, "internal") and "secret" not in e.message  # never a bare 500


def test_head_card_must_match_the_served_encoder():
    from medray.encoders.heads import ModelCard

    card = ModelCard(id="h", task="binary", labels=["y"], encoder={"weights_hash": "a" * 64})
    check_head_card(card, 32, {"weights_hash": "a" * 64, "dim": 32})
    with pytest.raises(HeadRefused, match="weights"):
        check_head_card(card, 32, {"weights_hash": "b" * 64, "dim": 32})
    with pytest.raises(HeadRefused, match="32-d"):
        check_head_card(card, 32, {"weights_hash": "a" * 64, "dim": 64})


# ------------------------------------------------------------------------------ decode parity
@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from medray.encoders import build_tiny_checkpoint, get_spec

    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path_factory.mktemp("ckpt")), arch="dinov2", image_size=32)
    return get_spec("hf_image", checkpoint=ckpt)


def test_decode_input_equals_the_batch_job_decode_stage(tiny_spec, tmp_path):
    from medray.encoders import create_preprocessor
    from medray.pipeline import StageOptions, decode_batch
    from medray.testing.samples import generate_samples

    info = generate_samples(str(tmp_path / "s"), n=8)
    windows = {"CT": [-600.0, 1500.0]}  # conf/embed.yaml and conf/serve.yaml
    settings = DecodeSettings(windows=windows, max_frames=8)
    pre = create_preprocessor(tiny_spec)
    opts = StageOptions(windows=windows, encoder_spec=tiny_spec)
    for rel in [p for p in info["dicom"] if p.endswith(("ct.dcm", "0004_dx.dcm"))] + info["photos"]:
        data = (tmp_path / "s" / rel).read_bytes()
        served = decode_input({"data": data, "name": rel}, settings, pre)
        table = pa.table(
            {
                "uri": [rel],
                "member": [""],
                "data": pa.array([data], pa.large_binary()),
                "status": ["ok"],
                "stage": [None],
                "error_class": [None],
                "message": [None],
            }
        )
        row = decode_batch(table, opts).to_pylist()[0]
        batch = np.frombuffer(row["pixel_values"], np.float32).reshape(row["pixel_shape"])
        assert served.frames == row["frames"] and served.modality == row["modality"]
        np.testing.assert_array_equal(served.pixels, batch)


def test_decode_input_limits_and_uri_policy(tiny_spec):
    from medray.encoders import create_preprocessor

    pre = create_preprocessor(tiny_spec)
    with pytest.raises(LimitExceeded, match="max_frames"):
        decode_input({"data": _multiframe()}, DecodeSettings(max_frames=1), pre)
    with pytest.raises(ReadError, match="allowed prefix"):
        decode_input({"uri": "s3://b/x.png"}, DecodeSettings(allowed_uri_prefixes=("s3://c/",)), pre)
    with pytest.raises(UnsupportedFormat):
        decode_input({"data": b"\x00" * 300}, DecodeSettings(), pre)
    assert decode_input({"data": _png()}, DecodeSettings(), pre).pixels.shape == (1, 3, 32, 32)


def _multiframe() -> bytes:
    import tempfile
    from pathlib import Path

    from medray.testing.samples import generate_samples

    with tempfile.TemporaryDirectory() as tmp:
        info = generate_samples(tmp, n=5, hostile=False, phi=False)
        return (Path(tmp) / info["multiframe"][0]).read_bytes()


@pytest.mark.parametrize("family,arch", [("hf_audio", "wav2vec2"), ("hf_text", "bert")])
def test_audio_and_text_inputs_equal_the_batch_job(family, arch, tmp_path):
    """Windows / chunks and their provenance as `medray embed`'s decode stage makes them; other
    modalities than the encoder's are refused with 415's class."""
    from medray.encoders import build_tiny_checkpoint, create_preprocessor, get_spec
    from medray.pipeline import StageOptions, decode_batch
    from medray.testing.media import encode, tone

    spec = get_spec(family, checkpoint=build_tiny_checkpoint(family, str(tmp_path / "ckpt"), arch=arch))
    pre = create_preprocessor(spec)
    if family == "hf_audio":
        data, modality = encode(tone(44100, 5.0, channels=2), 44100), "audio"
    else:
        data, modality = ("Findings: no effusion. " * 200).encode(), "text"
    settings = DecodeSettings(max_frames=1000)
    served = decode_input({"data": data, "name": "x"}, settings, pre, modality=modality)
    table = pa.table(
        {
            "uri": ["x"],
            "member": [""],
            "data": pa.array([data], pa.large_binary()),
            "status": ["ok"],
            "stage": [None],
            "error_class": [None],
            "message": [None],
        }
    )
    opts = StageOptions(encoder_spec=spec)
    row = decode_batch(table, opts).to_pylist()[0]
    assert row["status"] == "ok", row
    batch = np.frombuffer(row["pixel_values"], np.dtype(row["pixel_dtype"])).reshape(row["pixel_shape"])
    np.testing.assert_array_equal(served.pixels, batch)
    assert served.segments == json.loads(row["segments"]) and served.pool == row["pool"] == "mean"
    assert len(served.frames) > 1  # 5 s in 2 s windows (last padded); a long report in several chunks
    with pytest.raises(UnsupportedFormat, match=f"embeds {modality} inputs; the input is image"):
        decode_input({"data": _png()}, settings, pre, modality=modality)
    with pytest.raises(LimitExceeded, match="max_frames"):
        decode_input({"data": data, "name": "x"}, DecodeSettings(max_frames=1), pre, modality=modality)


# ---- request limits: JSON depth, headers, and no bare 500


def test_json_depth_counts_brackets_outside_strings_only():
    from medray.serve.ingress import json_depth

    assert json_depth(b'{"a": [1, {"b": "[[[[]"}]}', 1) == 3
    assert json_depth(b'{"a": "x\\\\\\"[[[[[[[[[[[["}', 2) == 1  # escaped quote and backslash inside a string
    assert json_depth(b"[" * 100_000 + b"]" * 100_000, 64) == 100_000
    assert json_depth(b'{"bytes_b64": "AAAA"}', 64) <= 64  # few brackets: no scan, an upper bound


def test_deep_json_is_a_422_before_parsing():
    import asyncio

    from medray.serve.ingress import ApiError, IngressSettings, parse_input

    body = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ApiError) as err:
        asyncio.run(parse_input("application/json", body, IngressSettings(max_json_depth=64)))
    assert (err.value.status, err.value.code) == (422, "too_deep")


def test_an_unexpected_failure_is_a_503_not_a_500():
    from medray.serve.ingress import error_for_exception

    err = error_for_exception(KeyError("patient-name"))
    assert err.status == 503 and "patient-name" not in err.message and err.headers.get("Retry-After")


def test_timeline_gives_a_server_timing_header_with_the_replica_stages_and_the_hop():
    from medray.serve.ingress import Timeline

    tl = Timeline()
    tl.mark("read")
    tl.add("handle", 0.010)
    tl.add_replica({"decode_s": 0.002, "gate_s": 0.0, "batch_wait_s": 0.001, "forward_s": 0.005, "replica_s": 0.009})
    tl.add_replica(None)  # a result without timings (heads, errors) adds nothing
    header = tl.header()
    stages = dict(part.split(";dur=") for part in header.split(", "))
    assert list(stages)[-1] == "total"
    assert {"read", "handle", "decode", "gate", "batch", "forward", "replica", "hop"} <= set(stages)
    assert float(stages["hop"]) == pytest.approx(1.0)  # 10 ms handle - 9 ms on the replica
    assert float(stages["forward"]) == pytest.approx(5.0)
    assert all(float(v) >= 0 for v in stages.values())


def test_header_limit_middleware_answers_431_before_the_app_runs():
    from medray.serve.ingress import api

    sent: list = []
    ran: list = []

    async def app(scope, receive, send):  # the wrapped app: must not run for oversized headers
        ran.append(scope["path"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    middleware = next(m.cls for m in api.user_middleware if m.cls.__name__ == "_HeaderLimit")(app)  # type: ignore[attr-defined]
    api.state.max_header_bytes = 100
    scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": [(b"x-padding", b"a" * 200)]}
    asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 431 and ran == []
    assert json.loads(sent[1]["body"])["code"] == "headers_too_large"

    class Served:  # Serve runs a copy of `api`: the limit is read from the app in the scope
        class state:
            max_header_bytes = 1000

    sent.clear()
    asyncio.run(middleware({**scope, "app": Served()}, receive, send))  # 209 bytes: under this app's limit
    assert sent == [] and ran == ["/healthz"]
