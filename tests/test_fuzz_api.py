"""Fuzzed requests against the HTTP API (issue 16): schemathesis generates requests from the app's own
OpenAPI document (every operation, valid and invalid parameters and bodies, other methods) and checks
the answers against it; hypothesis posts mutated and bomb-headed images. Every answer must be a
documented one: a 2xx, or a 4xx with a JSON `detail` message; never a 5xx, except the deliberate 503
(busy) with Retry-After.

The app runs in this process through ASGI (schemathesis) and starlette's TestClient, lifespan
included, so the decode threads and the batcher are the real ones. Examples are bounded; the module
prints how many requests it sent.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fuzzing import CaseCount, claimed_sizes, mutated_images, report
from imgcls.predict import Classifier
from imgcls.serve import ServeSettings, create_app
from test_serve import CLASS_NAMES, make_artifact

SETTINGS = ServeSettings(max_upload_mb=0.25, max_images=3, max_batch=4, batch_wait_ms=1)
_FUZZ = settings(deadline=10_000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COUNT = CaseCount()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL", "ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    report(request, COUNT.summary("test_fuzz_api"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    clf = Classifier.load(make_artifact(tmp_path_factory.mktemp("fuzz_api") / "model"), device="cpu", precision="fp32")
    return create_app(clf, SETTINGS)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


def assert_documented(status: int, headers, body: bytes, what: str) -> None:
    """A 2xx, or a 4xx with a JSON message; 503 only as "busy" with Retry-After. Never another 5xx."""
    import json

    assert status < 500 or (status == 503 and "retry-after" in {k.lower() for k in headers}), (what, status, body[:300])
    if status >= 400:
        detail = json.loads(body)["detail"]
        assert detail and isinstance(detail, (str, list)), (what, detail)


# ----------------------------------------------------------------------------- from the OpenAPI document


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(_FUZZ, max_examples=40)
def test_every_operation_answers_as_documented(case):
    """schemathesis' checks (status codes, content types, response schemas, other methods give 405)
    and ours; not `positive_data_acceptance`: schema-valid bytes need not be a decodable image."""
    COUNT.add(f"schemathesis: {case.path}")  # every method, the documented one and the 405s
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    assert_documented(response.status_code, response.headers, response.content, f"{case.method} {case.path}")


def test_the_openapi_document_bounds_the_uploads(app):
    field = app.openapi()["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"]
    assert (field["minItems"], field["maxItems"]) == (1, SETTINGS.max_images)


# ----------------------------------------------------------------------------- broken images


def check_answer(r, names: list[str]) -> None:
    assert_documented(r.status_code, r.headers, r.content, str(names))
    assert r.status_code in (200, 400, 413, 415), (r.status_code, r.text)
    if r.status_code == 200:
        assert [p["label"] for p in r.json()["predictions"]] and all(p["label"] in CLASS_NAMES for p in r.json()["predictions"])
    elif names[0]:  # a refused image is named in the message
        assert any(n in r.json()["detail"] for n in names), r.text


@settings(_FUZZ, max_examples=60)
@given(case=mutated_images(), multipart=st.booleans())
def test_a_mutated_image_is_answered_or_refused_with_4xx(client, case, multipart):
    fmt, kind, data = case
    COUNT.add("hypothesis: mutated images")
    if multipart:
        r = client.post("/v1/predict", files=[("file", (f"{fmt}-{kind}.img", data, "application/octet-stream"))])
    else:
        r = client.post("/v1/predict", content=data, headers={"Content-Type": "application/octet-stream"})
    check_answer(r, [f"{fmt}-{kind}.img" if multipart else ""])
    if data == b"":
        assert r.status_code == 400


@settings(_FUZZ, max_examples=40)
@given(case=claimed_sizes())
def test_an_image_whose_header_claims_a_huge_size_is_a_413(client, case):
    fmt, w, h, data = case
    COUNT.add("hypothesis: header-claimed sizes")
    r = client.post("/v1/predict", files=[("file", ("claim.img", data, "application/octet-stream"))])
    check_answer(r, ["claim.img"])
    if w * h > 100_000_000:  # the classifier's max_pixels
        assert r.status_code == 413, (fmt, w, h, r.text)


@settings(_FUZZ, max_examples=30)
@given(images=st.lists(mutated_images(), min_size=1, max_size=SETTINGS.max_images + 1))
def test_a_batch_of_images_is_answered_whole_or_refused(client, images):
    """Several uploads in one request: all answered (one prediction each) or the request refused."""
    COUNT.add("hypothesis: batches")
    names = [f"{i}-{fmt}-{kind}.img" for i, (fmt, kind, _) in enumerate(images)]
    r = client.post("/v1/predict", files=[("file", (n, d, "application/octet-stream")) for n, (_, _, d) in zip(names, images)])
    if len(images) > SETTINGS.max_images:
        assert r.status_code == 400 and "too many images" in r.json()["detail"], r.text
        return
    check_answer(r, names)
    if r.status_code == 200:
        assert [p["filename"] for p in r.json()["predictions"]] == names


@pytest.mark.parametrize("data", [b"B", b"(", b"\x00", b"BM"], ids=repr)
def test_a_one_or_two_byte_upload_is_a_415_not_a_500(client, data):
    """Found by the fuzzing: a plugin's signature check raised struct.error on a 1-byte body (a 500)."""
    r = client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and "not a recognised image format" in r.json()["detail"], r.text
