"""Payload round trip and rejection of bad arrays with a clear message."""

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from contract.arrays import ArrayPayload
from contract.payloads import Contribution
from edge.contribution import make_contribution


def contribution(**overrides) -> Contribution:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 16)).astype(np.float32)
    c = make_contribution("site-1", "enc-1", emb, ["a"] * 15 + ["b"] * 15, k=2)
    return c.model_copy(update=overrides) if overrides else c


def tampered(mutate) -> bytes:
    doc = json.loads(contribution().to_json_bytes())
    mutate(doc)
    return json.dumps(doc).encode()


def test_round_trip_is_exact() -> None:
    c = contribution()
    back = Contribution.model_validate_json(c.to_json_bytes())
    assert back == c
    for a, b in zip(c.labels, back.labels, strict=True):
        np.testing.assert_array_equal(a.vectors.to_numpy(), b.vectors.to_numpy())


def test_array_round_trip_float32_and_float16() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    np.testing.assert_array_equal(ArrayPayload.from_numpy(x, "float32").to_numpy(), x)
    np.testing.assert_array_equal(
        ArrayPayload.from_numpy(x, "float16").to_numpy(), x.astype(np.float16).astype(np.float32)
    )


def test_nan_is_rejected() -> None:
    def put_nan(doc):
        raw = np.frombuffer(base64.b64decode(doc["labels"][0]["vectors"]["data"]), "<f2").copy()
        raw[3] = np.nan
        doc["labels"][0]["vectors"]["data"] = base64.b64encode(raw.tobytes()).decode()

    with pytest.raises(ValidationError, match="NaN or infinite"):
        Contribution.model_validate_json(tampered(put_nan))


def test_nan_is_refused_at_encoding_too() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ArrayPayload.from_numpy(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="out of float16 range"):
        ArrayPayload.from_numpy(np.array([[1e6]]), "float16")


def test_wrong_shape_is_rejected() -> None:
    def grow(doc):
        doc["labels"][0]["vectors"]["shape"][1] += 1

    with pytest.raises(ValidationError, match=r"data holds \d+ bytes but shape \[\d+, 17\] with dtype float16 needs"):
        Contribution.model_validate_json(tampered(grow))


def test_wrong_dtype_is_rejected() -> None:
    def f64(doc):
        doc["labels"][0]["vectors"]["dtype"] = "float64"

    with pytest.raises(ValidationError, match="Input should be 'float16' or 'float32'"):
        Contribution.model_validate_json(tampered(f64))


def test_dtype_that_does_not_match_the_bytes_is_rejected() -> None:
    def f32(doc):
        doc["labels"][0]["vectors"]["dtype"] = "float32"

    with pytest.raises(ValidationError, match="needs"):
        Contribution.model_validate_json(tampered(f32))


def test_wrong_schema_version_missing_field_and_extra_field() -> None:
    with pytest.raises(ValidationError, match="schema_version"):
        Contribution.model_validate_json(tampered(lambda d: d.update(schema_version=2)))
    with pytest.raises(ValidationError, match="site_id"):
        Contribution.model_validate_json(tampered(lambda d: d.pop("site_id")))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Contribution.model_validate_json(tampered(lambda d: d.update(raw_images="...")))


def test_group_smaller_than_min_group_size_is_rejected() -> None:
    def shrink(doc):
        doc["labels"][0]["counts"][0] = 2

    with pytest.raises(ValidationError, match="fewer than min_group_size=5"):
        Contribution.model_validate_json(tampered(shrink))


def test_mixed_dimensions_and_bad_base64_and_bad_site_id() -> None:
    def mixed(doc):
        v = doc["labels"][1]["vectors"]
        v["shape"] = [v["shape"][0], 8]
        v["data"] = base64.b64encode(np.zeros(v["shape"][0] * 8, "<f2").tobytes()).decode()

    with pytest.raises(ValidationError, match="one embedding dimension"):
        Contribution.model_validate_json(tampered(mixed))
    with pytest.raises(ValidationError, match="not valid base64"):
        Contribution.model_validate_json(tampered(lambda d: d["labels"][0]["vectors"].update(data="%%%")))
    with pytest.raises(ValidationError, match="site_id"):
        Contribution.model_validate_json(tampered(lambda d: d.update(site_id="a/b#")))


def test_check_dim_names_the_encoder() -> None:
    with pytest.raises(ValueError, match="embedding dimension 16 does not match encoder 'enc-1' \\(32\\)"):
        contribution().check_dim(32)
