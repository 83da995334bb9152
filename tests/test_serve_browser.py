"""The demo page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium,
against `python -m jaxclf.serve` running as its own process on 127.0.0.1. `make test-browser` installs Chromium."""

import contextlib
import os
import shutil
import threading
import time

import httpx
import pytest

from jaxclf.runs import inference
from jaxclf import predict
from jaxclf.serve import ServeSettings, create_app, from_loaded
from jaxclf.serve.process import ServerProcess
from tests.model_helpers import explainable_trained_model
from limits import SUBPROCESS_S  # tests/ is on sys.path

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver, or `make test-browser`)",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_ready(url: str, timeout: float = SUBPROCESS_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"{url} was not ready after {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server_process(trained_workdir):
    """`python -m jaxclf.serve` on the tiny run, as a separate process on a free loopback port."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    args = ["--workdir", trained_workdir, "--import_file", "tests/tiny_config.py", "--image_size", "16", "--max_batch", "4"]
    with ServerProcess(args, env=env, cwd=REPO, ready_timeout=SUBPROCESS_S) as server:
        yield server.url


# Every image the page displays (not hidden, with a box on screen), with its alt text and whether it has pixels.
_DISPLAYED_IMAGES = """
return Array.from(document.images).filter((img) => img.getClientRects().length > 0)
  .map((img) => ({alt: img.alt, loaded: img.complete && img.naturalWidth > 0}));
"""


def _displayed_images(browser, screenshot: str) -> dict[str, bool]:
    """{alt text: has pixels} of the images the page displays, after saving a screenshot to `screenshot`."""
    assert browser.save_screenshot(screenshot)
    return {image["alt"]: image["loaded"] for image in browser.execute_script(_DISPLAYED_IMAGES)}


def _upload_and_read_top_class(browser, url: str, path: str, screenshots) -> str:
    """Open the page, upload `path`, return the top class shown; the page shows no image before the upload
    and no broken one after it (screenshots empty.png and result.png in the folder `screenshots`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: "checkpoint step" in d.find_element(By.ID, "model").text)
    assert _displayed_images(browser, str(screenshots / "empty.png")) == {}
    browser.find_element(By.ID, "file").send_keys(path)
    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, "top-class")))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.getElementById('preview').complete"))
    assert _displayed_images(browser, str(screenshots / "result.png")) == {"the uploaded image": True}
    return browser.find_element(By.ID, "top-class").text


def test_page_shows_the_top_class_of_an_uploaded_image(browser, server_process, trained_workdir, digits_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = os.path.join(digits_root, "val", "7", sorted(os.listdir(os.path.join(digits_root, "val", "7")))[0])
    (expected,), _ = predict.Predictor(inference.load_trained(trained_workdir)).predict_files([path], top_k=5)
    assert _upload_and_read_top_class(browser, server_process, path, tmp_path) == expected.classes[0]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .row")) == 5
    assert "tiny_cnn" in browser.find_element(By.ID, "model").text
    assert not browser.find_element(By.ID, "explain").is_displayed()  # tiny_cnn offers no explanation

    junk = tmp_path / "notes.png"
    junk.write_bytes(b"not an image at all")
    browser.find_element(By.ID, "file").send_keys(str(junk))
    WebDriverWait(browser, 30).until(lambda d: "not an image" in d.find_element(By.ID, "error").text)
    assert _displayed_images(browser, str(tmp_path / "error.png")) == {}  # no broken preview of the junk
    assert httpx.get(f"{server_process}/healthz").status_code == 200  # and it is still serving


def test_page_shows_the_explanation_overlay(browser, digits_root, tmp_path):
    """The same page on a model Grad-CAM can explain (uvicorn in a thread of this process, on loopback)."""
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cam = explainable_trained_model(str(tmp_path), tuple("0123456789"))
    app = create_app(from_loaded(cam, image_size=16), ServeSettings(max_batch=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        _wait_ready(url)
        path = os.path.join(digits_root, "val", "3", sorted(os.listdir(os.path.join(digits_root, "val", "3")))[0])
        top = _upload_and_read_top_class(browser, url, path, tmp_path)
        button = browser.find_element(By.ID, "explain")
        assert button.is_displayed()
        button.click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "overlay").is_displayed())
        assert browser.find_element(By.ID, "overlay").get_property("src").startswith("data:image/png;base64,")
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.getElementById('overlay').complete"))
        assert _displayed_images(browser, str(tmp_path / "overlay.png")) == {"the uploaded image": True,
                                                                            "where the model looked": True}
        shown = browser.find_element(By.ID, "explanation").text
        assert shown.startswith("Grad-CAM (final 8x8 map)") and f"for {top} (" in shown
    finally:
        server.should_exit = True
        thread.join(30)
