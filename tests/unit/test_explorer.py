"""The class explorer's server logic with a fake SDK client (the real stack and a real browser:
tests/integration/test_explorer_browser.py): routes, the job cache, errors shown in words."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from importlib import resources

import grpc
import pytest
from PIL import Image

from propscope import ModelInfo, ModelRole, PropscopeError, TensorInfo
from propscope.explorer import ExplorerService, ExplorerSettings, make_server, read_class_images
from propscope.explorer.jobs import Job, Jobs
from propscope.explorer.pictures import heat_overlay


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def model(name: str, role: ModelRole = ModelRole.CLASSIFIER, **fields) -> ModelInfo:
    values = dict(
        name=name,
        versions=("1", "2"),
        role=role,
        state="READY",
        inputs=(),
        outputs=(TensorInfo("LOGITS", "FP32", (3,)),),
        max_batch_size=8,
        editor_parameters=(),
        description="",
    )
    values.update(fields)
    return ModelInfo(**values)


class FakeClient:
    """The SDK calls the explorer makes; ``attribute`` fails while ``refusal`` is set."""

    target = "fake:1"

    def __init__(self) -> None:
        self.attribute_calls = 0
        self.refusal: PropscopeError | None = None

    def list_models(self):
        return [
            model("labelled", class_labels=("circle", "square")),
            model("unlabelled"),
            model("procedural", role=ModelRole.EDITOR),
            model("broken", state="UNAVAILABLE"),
        ]

    def attribute(self, image, name, **options):
        self.attribute_calls += 1
        if self.refusal is not None:
            raise self.refusal
        raise AssertionError("not reached in these tests")


@pytest.fixture
def explorer():
    client = FakeClient()
    service = ExplorerService(client, ExplorerSettings(workers=1))
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}", client
    finally:
        server.shutdown()
        server.server_close()
        service.close()


def call(url: str, data: bytes | None = None) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def job(base: str, **spec) -> dict:
    status, started = call(f"{base}/api/jobs", json.dumps(spec).encode())
    assert status == 200, started
    deadline = time.monotonic() + 10
    found = started
    while found["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
        found = call(f"{base}/api/jobs/{started['id']}")[1]
    return found


def test_models_are_the_ready_classifiers_with_their_classes(explorer):
    base, _ = explorer
    status, models = call(f"{base}/api/models")
    assert status == 200
    assert [m["name"] for m in models] == ["labelled", "unlabelled"]
    assert models[0]["versions"] == ["2", "1"]
    assert call(f"{base}/api/classes?model=labelled")[1] == [
        {"index": 0, "label": "circle"},
        {"index": 1, "label": "square"},
    ]
    # Without labels: the output's classes by index.
    assert [c["label"] for c in call(f"{base}/api/classes?model=unlabelled")[1]] == ["0", "1", "2"]
    status, refused = call(f"{base}/api/classes?model=procedural")
    assert status == 404 and "procedural" in refused["error"]["message"]


def test_a_gateway_refusal_is_shown_in_its_words_and_retried_not_cached(explorer):
    base, client = explorer
    status, upload = call(f"{base}/api/images", png((200, 10, 10)))
    assert status == 200 and (upload["width"], upload["height"]) == (8, 8)
    client.refusal = PropscopeError(
        grpc.StatusCode.FAILED_PRECONDITION, "model 'labelled' does not declare GRADIENT_CLASS"
    )
    spec = {"kind": "sobol", "model": "labelled", "version": "1", "class": 1, **upload}
    failed = job(base, **spec)
    assert failed["state"] == "failed"
    assert failed["error"] == {
        "code": "FAILED_PRECONDITION",
        "message": "model 'labelled' does not declare GRADIENT_CLASS",
    }
    again = job(base, **spec)
    assert again["id"] != failed["id"] and client.attribute_calls == 2


def test_concepts_without_class_images_refuse_naming_the_fix(explorer):
    base, _ = explorer
    spec = {"kind": "concepts", "model": "labelled", "version": "1", "class": 0}
    failed = job(base, **spec)
    assert failed["state"] == "failed" and "--images" in failed["error"]["message"]
    status, started = call(f"{base}/api/jobs", json.dumps({**spec, "kind": "nothing"}).encode())
    assert status == 400 and "nothing" in started["error"]["message"]


def test_a_finished_job_is_cached_per_key():
    jobs = Jobs(workers=1, capacity=2)
    calls = []

    def work(job: Job) -> int:
        calls.append(job.id)
        return len(calls)

    first = jobs.start(("a",), "kind", work)
    deadline = time.monotonic() + 10
    while first.state == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.to_dict()["result"] == 1
    assert jobs.start(("a",), "kind", work) is first and calls == [first.id]
    jobs.start(("b",), "kind", work)
    jobs.start(("c",), "kind", work)  # capacity 2: ("a",) is forgotten
    assert jobs.get(first.id) is None
    jobs.close()


def test_bad_requests_are_refused_in_words(explorer):
    base, _ = explorer
    status, refused = call(f"{base}/api/images", b"not an image")
    assert status == 400 and "PNG or JPEG" in refused["error"]["message"]
    spec = {"kind": "sobol", "model": "labelled", "class": 0, "image_id": "unknown"}
    status, refused = call(f"{base}/api/jobs", json.dumps(spec).encode())
    assert status == 404 and "upload it again" in refused["error"]["message"]
    status, refused = call(f"{base}/api/jobs", json.dumps({**spec, "class": -1}).encode())
    assert status == 400 and "class" in refused["error"]["message"]
    assert call(f"{base}/api/jobs/unknown")[0] == 404


def test_the_page_is_served_from_the_package_without_network(explorer):
    base, _ = explorer
    with urllib.request.urlopen(f"{base}/", timeout=10) as answer:
        page = answer.read().decode()
    assert 'src="/static/explorer.js"' in page
    for name in ("index.html", "explorer.js", "explorer.css"):
        text = (resources.files("propscope.explorer") / "static" / name).read_text()
        assert "http://" not in text.replace('"http://www.w3.org/2000/svg"', "")
        assert "https://" not in text


def test_heat_overlay_is_an_image_of_the_shrunk_size():
    image = Image.new("RGB", (300, 200), (128, 128, 128))
    uri = heat_overlay(image, [[0.0, 1.0], [2.0, 3.0]], max_side=150)
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.size == (150, 100)
    pixels = decoded.convert("RGB")
    # The map's lowest corner is blue-ish, its highest red-ish (jet).
    low, high = pixels.getpixel((0, 0)), pixels.getpixel((149, 99))
    assert low[2] > low[0] and high[0] > high[2]


def test_class_images_are_read_from_a_manifest(tmp_path):
    (tmp_path / "a.png").write_bytes(png((0, 0, 0)))
    (tmp_path / "b.png").write_bytes(png((9, 9, 9)))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,label\na.png,1\nb.png,0\n")
    assert read_class_images(manifest) == {1: [tmp_path / "a.png"], 0: [tmp_path / "b.png"]}
    manifest.write_text("image,label\nmissing.png,1\n")
    with pytest.raises(ValueError, match="no image at"):
        read_class_images(manifest)


@pytest.mark.parametrize("image_class", ["thumb", "step", "overlay", "small-overlay"])
def test_an_uploaded_images_boxes_keep_its_aspect_ratio(image_class):
    """A 480 x 320 photo, its path steps and its map overlays are drawn in square boxes:
    contained, not stretched."""
    css = resources.files("propscope.explorer").joinpath("static/explorer.css").read_text()
    rule = next(line for line in css.splitlines() if line.startswith(f"img.{image_class} {{"))
    assert "object-fit: contain" in rule
