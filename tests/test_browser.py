"""The web page in a real browser: headless Debian Chromium driven by selenium against the real server.

Not skipped when Chromium is missing: the test fails and says how to install it
(`apt-get install -y chromium chromium-driver`; `.ci/run` does this).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.predict import Classifier
from imgcls.serve import ServeSettings, create_app
from test_serve import make_artifact, serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL = "install Chromium with `apt-get install -y chromium chromium-driver` (Debian; .ci/run does this)"
SCREENSHOT = Path(tempfile.gettempdir()) / "imgcls-page.png"
WAIT_S = 30


def photo(path: Path) -> Path:
    """scikit-image's cat photo (imgcls[test] installs scikit-image), else a smooth gradient."""
    try:
        from skimage import data

        img = Image.fromarray(data.chelsea()).resize((300, 225))
    except ImportError:
        y, x = np.mgrid[0:225, 0:300]
        img = Image.fromarray(np.stack([x * 255 // 300, y * 255 // 225, np.full_like(x, 128)], -1).astype(np.uint8))
    img.save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"Chromium or chromedriver not found ({CHROMIUM}, {CHROMEDRIVER}): {INSTALL}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,760",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)  # explicit paths: no driver download
    d.set_page_load_timeout(WAIT_S)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    clf = Classifier.load(make_artifact(tmp_path_factory.mktemp("browser") / "model"), device="cpu", precision="fp32")
    with serving(create_app(clf, ServeSettings())) as url:
        yield url, clf


def test_page_classifies_an_uploaded_image(driver, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, clf = served
    image = photo(tmp_path / "chelsea.jpg")
    driver.get(f"{url}/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    WebDriverWait(driver, WAIT_S).until(lambda d: "small_cnn" in d.find_element(By.ID, "model-info").text)

    driver.find_element(By.ID, "file-input").send_keys(str(image))
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", driver.find_element(By.ID, "status").text

    expected = clf.predict(str(image), top_k=5)
    shown = driver.find_element(By.ID, "prediction")
    assert shown.get_attribute("data-label") == shown.text == expected["label"]
    rows = driver.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert [r.find_element(By.CLASS_NAME, "bar-label").text for r in rows] == [t["label"] for t in expected["top_k"]]
    assert [r.find_element(By.CLASS_NAME, "bar-pct").text for r in rows] == [f"{t['score'] * 100:.1f}%" for t in expected["top_k"]]
    # the preview is shown, with the (empty) overlay layer sized to the image's pixels
    assert driver.find_element(By.ID, "preview-img").get_attribute("naturalWidth") == "300"
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "overlay").get_attribute("width") == "300")
    driver.save_screenshot(str(SCREENSHOT))

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script errors, no blocked or failed loads


def test_page_reports_a_file_that_is_not_an_image(driver, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    driver.get(f"{url}/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    driver.find_element(By.ID, "file-input").send_keys(str(bad))
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    assert "not a recognised image format" in driver.find_element(By.ID, "status").text
