"""The HTTP server in process (Starlette's TestClient): every endpoint and every bad input, results equal to
jaxclf.predict on the same files, dynamic batching onto compiled shapes only, and the page's explanation."""

import asyncio
import base64
import concurrent.futures
import dataclasses
import io
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageFile
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from jaxclf.runs import artefact, inference
from jaxclf import explain, export, predict
from jaxclf.serve import ServeSettings, create_app, from_loaded
from jaxclf.serve import __main__ as serve_main
from jaxclf.serve.batcher import DynamicBatcher, padded_sizes
from jaxclf.serve.metrics import ServerMetrics
from tests.big_png import big_png  # 14000: over twice Pillow's limit, refused by Pillow; 12000: only warned about
from tests.model_helpers import explainable_trained_model
from limits import SUBPROCESS_S  # tests/ is on sys.path

SETTINGS = ServeSettings(max_batch=8, max_wait_ms=20.0, max_upload_mb=0.25, max_images=4)


@pytest.fixture(scope="module")
def trained(trained_workdir):
    return inference.load_trained(trained_workdir)


@pytest.fixture(scope="module")
def val_files(digits_root) -> list[str]:
    """Two validation digits of each class, as files on disk."""
    val = os.path.join(digits_root, "val")
    return [os.path.join(val, c, name) for c in sorted(os.listdir(val)) for name in sorted(os.listdir(os.path.join(val, c)))[:2]]


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + SUBPROCESS_S
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, f"the server did not become ready in {SUBPROCESS_S} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(trained):
    with TestClient(create_app(from_loaded(trained, image_size=16), SETTINGS)) as client:
        _wait_ready(client)
        yield client


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _files(paths) -> list:
    return [("images", (os.path.basename(p), _read(p), "image/png")) for p in paths]


def _expected(trained, paths, top_k):
    predictions, skipped = predict.Predictor(trained).predict_files(paths, top_k=top_k)
    assert not skipped
    return predictions


def _assert_same(got: list[dict], expected: list[predict.Prediction]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g["classes"]) == e.classes
        np.testing.assert_allclose(g["probabilities"], e.probabilities, rtol=1e-5, atol=1e-7)


def _error(response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["status"], error["kind"]) == (status, kind)
    return error["message"]


def test_classify_equals_predict_in_every_encoding(client, trained, val_files):
    paths = val_files[:4]
    expected = _expected(trained, paths, top_k=3)
    multipart = client.post("/v1/classify", params={"top_k": 3}, files=_files(paths))
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert (body["model"], body["checkpoint_step"]) == ("tiny_cnn", trained.step)
    assert [p["image"] for p in body["predictions"]] == [os.path.basename(p) for p in paths]
    assert set(body["latency_ms"]) == {"total", "read", "decode", "queue", "model"}
    _assert_same(body["predictions"], expected)

    encoded = [base64.b64encode(_read(p)).decode() for p in paths]
    as_json = client.post("/v1/classify", json={"images": [encoded[0], "data:image/png;base64," + encoded[1], *encoded[2:]],
                                                 "top_k": 3})
    assert as_json.status_code == 200, as_json.text
    _assert_same(as_json.json()["predictions"], expected)

    raw = client.post("/v1/classify", content=_read(paths[0]), headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    _assert_same(raw.json()["predictions"], _expected(trained, paths[:1], top_k=5))  # the default top_k
    everything = client.post("/v1/classify", data={"top_k": "99"}, files=_files(paths[:1]))  # a form field; clipped
    assert len(everything.json()["predictions"][0]["classes"]) == len(trained.class_names)


def test_concurrent_requests_each_get_their_own_result_and_are_batched(trained, val_files):
    expected = {p.path: p for p in _expected(trained, val_files, top_k=2)}
    start = threading.Barrier(len(val_files))
    # Up to 2 s to gather a batch (the default 20 ms is a thread-timing bet on a loaded machine): 20 requests
    # released together fill a batch of 8 long before, on any machine, and some share a model call.
    settings = dataclasses.replace(SETTINGS, max_wait_ms=2000.0)
    with TestClient(create_app(from_loaded(trained, image_size=16), settings)) as client:
        _wait_ready(client)

        def one(path):
            start.wait()
            return path, client.post("/v1/classify", params={"top_k": 2}, files=_files([path]))

        with concurrent.futures.ThreadPoolExecutor(len(val_files)) as pool:
            answers = list(pool.map(one, val_files))
    for path, response in answers:
        assert response.status_code == 200, response.text
        _assert_same(response.json()["predictions"], [expected[path]])
    assert max(r.json()["predictions"][0]["batch_images"] for _, r in answers) > 1


def test_no_request_pays_a_compile(client, trained, val_files):
    compiled = trained._jitted_apply._cache_size()
    assert compiled >= len(padded_sizes(SETTINGS.max_batch))
    for count in (1, 3, 4):
        assert client.post("/v1/classify", files=_files(val_files[:count])).status_code == 200
    assert trained._jitted_apply._cache_size() == compiled


def test_the_batcher_fills_padded_batches_in_order(trained, val_files):
    images = np.stack([trained.load_image(p) for p in val_files[:11]])
    shapes = []

    def logits(batch):
        shapes.append(batch.shape[0])
        return trained.logits(batch)

    async def classify_all():
        batcher = DynamicBatcher(logits, images.shape[1:], max_batch=4, max_wait_s=0.001, metrics=ServerMetrics((1, 2, 4)))
        running = asyncio.create_task(batcher.run())
        await asyncio.sleep(0)  # the batcher's queue exists once it runs
        try:
            return await batcher.classify(list(images))
        finally:
            running.cancel()
            batcher.close()

    results = asyncio.run(classify_all())
    assert shapes == [4, 4, 4]  # 11 images queued at once: 4, 4 and 3 padded to 4
    assert [r.batch_images for r in results] == [4] * 8 + [3] * 3
    np.testing.assert_allclose(np.stack([r.logits for r in results]), trained.logits(images), rtol=1e-5, atol=1e-6)
    assert padded_sizes(32) == (1, 2, 4, 8, 16, 32) and padded_sizes(12) == (1, 2, 4, 8, 12) and padded_sizes(1) == (1,)


def _png(shape) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(shape, 128, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_input_is_a_json_error_and_the_server_goes_on(client, trained, val_files):
    good = _read(val_files[0])
    errors_before = _metric_samples(client, "jaxclf_errors_total")

    def post_one(name, data):
        return client.post("/v1/classify", files=[("images", (name, data, "application/octet-stream"))])

    assert "notes.txt" in _error(post_one("notes.txt", b"these are not pixels"), 400, "not_an_image")
    assert "truncated" in _error(post_one("cut.png", good[: len(good) // 2]), 400, "truncated_image")
    limit = "over this server's limit of 89,478,485 pixels"
    assert limit in _error(post_one("bomb.png", big_png(14000)), 413, "too_many_pixels")
    bomb = big_png(12000)
    assert f"12000x12000 = 144,000,000 pixels, {limit}" in _error(post_one("bomb.png", bomb), 413, "too_many_pixels")
    as_json = client.post("/v1/classify", json={"images": [base64.b64encode(bomb).decode()]})
    assert limit in _error(as_json, 413, "too_many_pixels")
    assert "20x20" in _error(post_one("big.png", _png((20, 20, 3))), 400, "wrong_size")
    # One bad image fails its request, named, whatever the others are.
    mixed = client.post("/v1/classify", files=_files(val_files[:2]) + [("images", ("x.png", b"junk", "image/png"))])
    assert "x.png" in _error(mixed, 400, "not_an_image")

    oversized = os.urandom(300 * 1024)
    _error(client.post("/v1/classify", content=oversized, headers={"content-type": "image/png"}), 413, "upload_too_large")
    chunked = iter([oversized[i : i + 65536] for i in range(0, len(oversized), 65536)])  # no Content-Length
    _error(client.post("/v1/classify", content=chunked, headers={"content-type": "image/png"}), 413, "upload_too_large")
    _error(client.post("/v1/classify", files=_files(val_files[:5])), 413, "too_many_images")
    _error(client.post("/v1/classify", files=_files(val_files[:6])), 413, "too_many_images")
    encoded = base64.b64encode(good).decode()
    _error(client.post("/v1/classify", json={"images": [encoded] * 5}), 413, "too_many_images")

    assert "text/plain" in _error(client.post("/v1/classify", content=b"hi", headers={"content-type": "text/plain"}),
                                  415, "unsupported_media_type")
    _error(client.post("/v1/classify", content=good), 415, "unsupported_media_type")  # no content type
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/classify"), 405, "method_not_allowed")
    _error(client.post("/v1/classify", json={"images": ["%%%"]}), 400, "bad_base64")
    _error(client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}), 400, "bad_json")
    _error(client.post("/v1/classify", json={"pictures": []}), 400, "bad_request")
    _error(client.post("/v1/classify", json={"images": []}), 400, "no_images")
    _error(client.post("/v1/classify", params={"top_k": "0"}, files=_files(val_files[:1])), 400, "bad_request")
    _error(client.post("/v1/classify", params={"top_k": "three"}, files=_files(val_files[:1])), 400, "bad_request")

    after = client.post("/v1/classify", files=_files(val_files[:1]), params={"top_k": 3})
    assert after.status_code == 200
    _assert_same(after.json()["predictions"], _expected(trained, val_files[:1], top_k=3))
    errors = _metric_samples(client, "jaxclf_errors_total")
    added = {kind: errors.get(kind, 0) - errors_before.get(kind, 0) for kind in errors}
    assert added["not_an_image"] == 2 and added["too_many_images"] == 3 and added["too_many_pixels"] == 3
    assert added["upload_too_large"] == 2 and added["unsupported_media_type"] == 2 and added["not_found"] == 1


def _metric_samples(client, name: str) -> dict:
    text = client.get("/metrics").text
    return {tuple(s.labels.values())[0] if s.labels else "": s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def test_model_card_health_and_metrics(client, trained, trained_workdir, val_files):
    response = client.get("/v1/model")
    card = response.json()
    assert card["classes"] == list(trained.class_names) and card["num_classes"] == 10
    assert card["input_size"] == [16, 16] and card["checkpoint_step"] == trained.step
    assert card["preprocessing"]["pp_eval"] == "decode" and card["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert card["provenance"] == {"format": "jax", "run": os.path.basename(trained_workdir), "weights": "ema",
                                  "checkpoint_step": trained.step, "model_init": None}
    assert os.path.dirname(os.path.abspath(trained_workdir)) not in response.text  # no path on the server's disk
    assert card["batching"]["batch_sizes"] == [1, 2, 4, 8] and card["explain"] is None
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200

    images_before = _metric_samples(client, "jaxclf_images_total")[""]
    assert client.post("/v1/classify", files=_files(val_files[:3])).status_code == 200
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert _metric_samples(client, "jaxclf_images_total")[""] == images_before + 3
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    for name in ("jaxclf_requests", "jaxclf_errors", "jaxclf_batch_images", "jaxclf_queue_seconds",
                 "jaxclf_model_seconds", "jaxclf_decode_seconds", "jaxclf_request_seconds", "jaxclf_ready"):
        assert name in families, name
    requests = {tuple(s.labels.values()): s.value for s in families["jaxclf_requests"].samples if s.name.endswith("_total")}
    assert requests[("/v1/model", "200")] >= 1
    assert _metric_samples(client, "jaxclf_ready")[""] == 1
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text


def test_the_pixel_limit_is_the_servers_option_and_refuses_before_decoding(trained, val_files, monkeypatch):
    """--max_image_pixels (from_loaded's max_image_pixels) replaces the run's limit, in the card and in the
    refusal; an image over it is refused from its header: Pillow never decodes a pixel of it."""
    served = from_loaded(trained, image_size=16, max_image_pixels=16 * 16 - 1)
    assert from_loaded(trained, image_size=16).max_image_pixels == trained.config.data.max_image_pixels == 89_478_485
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))  # decoding: noted, not done
    with TestClient(create_app(served, SETTINGS)) as client:
        _wait_ready(client)
        assert client.get("/v1/model").json()["limits"]["max_image_pixels"] == 255
        message = _error(client.post("/v1/classify", files=_files(val_files[:1])), 413, "too_many_pixels")
    assert "16x16 = 256 pixels, over this server's limit of 255 pixels" in message and not loads


def test_error_messages_name_no_path_on_the_server(trained, val_files, tmp_path):
    """An exception's text that holds a host path reaches the client with the file's base name only."""
    secret = str(tmp_path / "private" / "store" / "digit.png")

    def failing_load_image(name, data):
        raise OSError(f"cannot read {secret}: permission denied")

    served = dataclasses.replace(from_loaded(trained, image_size=16), load_image=failing_load_image)
    with TestClient(create_app(served, SETTINGS)) as client:
        _wait_ready(client)
        message = _error(client.post("/v1/classify", files=_files(val_files[:1])), 400, "bad_image")
    assert "cannot read digit.png: permission denied" in message and str(tmp_path) not in message


def test_not_ready_until_every_batch_shape_is_compiled(trained, val_files):
    release = threading.Event()
    served = from_loaded(trained, image_size=16)

    def held_logits(images):
        release.wait(60)
        return served.logits(images)

    with TestClient(create_app(dataclasses.replace(served, logits=held_logits), SETTINGS)) as client:
        _error(client.get("/readyz"), 503, "not_ready")
        assert client.get("/healthz").status_code == 200
        _error(client.post("/v1/classify", files=_files(val_files[:1])), 503, "not_ready")
        release.set()
        _wait_ready(client)
        assert client.post("/v1/classify", files=_files(val_files[:1])).status_code == 200


def test_explain_returns_jaxclf_explain_overlay(trained, client, tmp_path, val_files):
    _error(client.post("/v1/explain", files=_files(val_files[:1])), 501, "explain_unavailable")  # tiny_cnn has no hook

    cam = explainable_trained_model(str(tmp_path), ("round", "square", "star"))
    with TestClient(create_app(from_loaded(cam, image_size=16), dataclasses.replace(SETTINGS, max_batch=1))) as cam_client:
        _wait_ready(cam_client)
        assert cam_client.get("/v1/model").json()["explain"] == "Grad-CAM"
        response = cam_client.post("/v1/explain", files=_files(val_files[:1]), data={"class": "star"})
        assert response.status_code == 200, response.text
        body = response.json()
        _error(cam_client.post("/v1/explain", files=_files(val_files[:2])), 413, "too_many_images")
        _error(cam_client.post("/v1/explain", files=_files(val_files[:1]), data={"class": "moon"}), 400, "bad_request")
    image = cam.load_image(val_files[0])
    expected = explain.explain(cam, image, "star")
    assert (body["method"], body["class"], body["predicted"]) == ("Grad-CAM", "star", expected["predicted"])
    np.testing.assert_allclose(body["probability"], expected["probability"], rtol=1e-5)

    def decode(url):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))

    np.testing.assert_array_equal(decode(body["image_png"]), image)
    overlay = explain.blend_heatmap(image, expected["heatmap"])
    assert np.abs(decode(body["overlay_png"]).astype(int) - overlay).max() <= 1


@pytest.mark.parametrize("fmt", ["stablehlo", "tflite"])
def test_an_exported_artefact_serves_the_same_predictions(trained, trained_workdir, val_files, tmp_path, fmt):
    path = str(tmp_path / f"digits.{fmt}")
    assert export.main(["--workdir", trained_workdir, "--format", fmt, "--out", path, "--image_size", "16"]) == 0
    settings = dataclasses.replace(SETTINGS, max_batch=2)
    with TestClient(create_app(from_loaded(artefact.load_artefact(path)), settings)) as client:
        _wait_ready(client)
        card = client.get("/v1/model").json()
        assert card["provenance"]["format"] == fmt and card["provenance"]["artefact"] == f"digits.{fmt}"
        assert card["provenance"]["run"] == os.path.basename(trained_workdir) and str(tmp_path) not in str(card)
        assert (card["model"], card["input_size"], card["classes"]) == ("tiny_cnn", [16, 16], list(trained.class_names))
        response = client.post("/v1/classify", params={"top_k": 3}, files=_files(val_files[:3]))
        assert response.status_code == 200, response.text
        assert response.json()["checkpoint_step"] == trained.step
        _assert_same(response.json()["predictions"], _expected(trained, val_files[:3], top_k=3))
        assert fmt in _error(client.post("/v1/explain", files=_files(val_files[:1])), 501, "explain_unavailable")


def test_command_line_mistakes_exit_2(trained_workdir, tmp_path, capsys):
    assert serve_main.main(["--workdir", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serve_main.main(["--workdir", trained_workdir]) == 2  # pp_eval "decode" leaves the size open
    assert "pass --image_size" in capsys.readouterr().err
    assert serve_main.main(["--workdir", trained_workdir, "--artefact", str(tmp_path / "x.stablehlo")]) == 2
    assert "either --workdir" in capsys.readouterr().err
    assert serve_main.main(["--artefact", str(tmp_path / "x.stablehlo")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main.main(["--workdir", trained_workdir, "--image_size", "16", "--max_batch", "0"])
