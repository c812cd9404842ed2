"""The web page in a real browser: headless Debian Chromium driven by selenium against the real server.

When Chromium or chromedriver is missing, the browser tests are skipped with the install command
(`apt-get install -y chromium chromium-driver`) on a developer's machine, so the README's test
command passes on a fresh machine; under CI (CI=true, which `.ci/run` sets after installing
Chromium) they fail instead, so CI can never go green without running them.
"""

from __future__ import annotations

import json
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


def under_ci() -> bool:
    """True when the CI environment variable says so (GitHub Actions, GitLab and .ci/run set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(message: str) -> None:
    """Skip with `message` on a developer's machine; fail with it under CI."""
    if under_ci():
        pytest.fail(f"{message} (CI is set: the browser test must run there)", pytrace=False)
    pytest.skip(message)


def require_browser(chromium: str, chromedriver: str) -> None:
    """Return when both executables are there, else skip or fail (see `missing`) naming the install command."""
    if not (os.access(chromium, os.X_OK) and os.access(chromedriver, os.X_OK)):
        missing(f"Chromium or chromedriver not found ({chromium}, {chromedriver}): {INSTALL}")


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
    require_browser(CHROMIUM, CHROMEDRIVER)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is missing: pip install -e '.[test]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,760",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
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


# --- the skip logic itself (runs everywhere, with or without Chromium) ----------------------


def test_missing_browser_is_skipped_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        require_browser(str(tmp_path / "chromium"), str(tmp_path / "chromedriver"))
    assert "apt-get install -y chromium chromium-driver" in str(info.value)
    assert str(tmp_path / "chromium") in str(info.value)


@pytest.mark.parametrize("value", ["true", "1", "True"])
def test_missing_browser_fails_under_ci(monkeypatch, tmp_path, value):
    monkeypatch.setenv("CI", value)
    present = shutil.which("sh") or "/bin/sh"
    with pytest.raises(pytest.fail.Exception) as info:  # either one missing is enough
        require_browser(present, str(tmp_path / "chromedriver"))
    assert "apt-get install -y chromium chromium-driver" in str(info.value) and "CI" in str(info.value)


def test_present_browser_passes(monkeypatch):
    monkeypatch.setenv("CI", "true")
    present = shutil.which("sh") or "/bin/sh"
    assert require_browser(present, present) is None
    monkeypatch.setenv("CI", "false")
    assert not under_ci()


# --- Grad-CAM on the page, and the report ------------------------------------------------------


def _wait_state(driver, *states: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in states)
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _painted_pixels(driver) -> int:
    """Opaque pixels on the overlay canvas (0 when nothing is drawn)."""
    return driver.execute_script(
        "const c = imgclsPage.overlay(); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;"
    )


def test_page_shows_the_grad_cam_overlay_with_a_toggle(driver, served, tmp_path):
    from selenium.webdriver.common.by import By

    url, clf = served
    image = photo(tmp_path / "chelsea.jpg")
    driver.get_log("browser")  # drop what earlier tests left in the log
    driver.get(f"{url}/")
    _wait_state(driver, "ready")
    body, toggle, canvas = (
        driver.find_element(By.TAG_NAME, "body"),
        driver.find_element(By.ID, "explain-toggle"),
        driver.find_element(By.ID, "overlay"),
    )
    assert toggle.is_selected() and body.get_attribute("data-overlay") == "none"
    driver.find_element(By.ID, "file-input").send_keys(str(image))
    assert _wait_state(driver, "done", "error") == "done", driver.find_element(By.ID, "status").text
    label = clf.predict(str(image))["label"]
    assert body.get_attribute("data-overlay") == "shown" and canvas.is_displayed()
    assert _painted_pixels(driver) == 300 * 225  # the overlay covers the whole image, at the image's own size
    assert f"evidence for “{label}”" in driver.find_element(By.ID, "explain-note").text
    driver.save_screenshot(str(SCREENSHOT.with_name("imgcls-page-gradcam.png")))
    toggle.click()
    assert body.get_attribute("data-overlay") == "hidden" and not canvas.is_displayed()
    toggle.click()
    assert body.get_attribute("data-overlay") == "shown" and canvas.is_displayed()
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_page_asks_for_the_overlay_when_the_toggle_is_turned_on(driver, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    image = photo(tmp_path / "chelsea.jpg")
    driver.get(f"{url}/")
    _wait_state(driver, "ready")
    body, toggle = driver.find_element(By.TAG_NAME, "body"), driver.find_element(By.ID, "explain-toggle")
    toggle.click()  # off: classify without an explanation
    driver.find_element(By.ID, "file-input").send_keys(str(image))
    assert _wait_state(driver, "done", "error") == "done"
    assert body.get_attribute("data-overlay") == "none" and _painted_pixels(driver) == 0
    toggle.click()  # on: the page asks the server again, now with ?explain=true
    WebDriverWait(driver, WAIT_S).until(lambda d: body.get_attribute("data-overlay") == "shown")
    assert _painted_pixels(driver) == 300 * 225


@pytest.fixture(scope="module")
def report_page(trained_run, tmp_path_factory) -> Path:
    """A report with every section: crafted predictions (three mistakes) on the trained run's test images, and an audit."""
    from imgcls.audit import AuditOptions, run_audit
    from imgcls.metrics import classification_metrics
    from imgcls.report import Predictions, read_history, write_report
    from test_report import CLASSES, crafted_probs, split_files

    run, data = trained_run
    out = tmp_path_factory.mktemp("report")
    paths, labels = split_files(data, "test")
    probs = crafted_probs(labels)
    audit = run_audit(data, AuditOptions(features="none"), progress=False, log=lambda _: None)
    (out / "audit.json").write_text(json.dumps(audit))
    return write_report(
        out,
        classification_metrics(probs, labels, CLASSES),
        CLASSES,
        read_history(run),
        title="small_cnn on test",
        predictions=Predictions(probs, labels, paths),
        model_dir=run,
        audit=out / "audit.json",
    )


def test_report_opens_offline_with_every_section_and_image(driver, report_page):
    from selenium.webdriver.common.by import By

    from test_report import SECTIONS

    driver.get_log("browser")  # drop what earlier tests left in the log
    driver.get(report_page.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert [s.get_attribute("id") for s in driver.find_elements(By.CSS_SELECTOR, "main > section")] == list(SECTIONS)
    assert [a.get_attribute("hash") for a in driver.find_elements(By.CSS_SELECTOR, "nav a")] == [f"#{s}" for s in SECTIONS]
    sizes = driver.execute_script("return Array.from(document.images, i => [i.complete, i.naturalWidth]);")
    assert len(sizes) >= 20 and all(done and width > 0 for done, width in sizes), sizes
    assert len(driver.find_elements(By.CSS_SELECTOR, "#losses .card img")) == 6  # 3 mistakes: image + Grad-CAM each
    # Printing: no navigation bar, and no figure or card split across pages.
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        assert driver.find_element(By.TAG_NAME, "nav").value_of_css_property("display") == "none"
        for css in ("figure", ".card", ".pair"):
            assert driver.find_element(By.CSS_SELECTOR, css).value_of_css_property("break-inside") == "avoid"
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    driver.save_screenshot(str(SCREENSHOT.with_name("imgcls-report.png")))
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_page_draws_one_bar_per_label_with_its_threshold(driver, tmp_path):
    """A multi-label model: the heading lists the labels above their thresholds, and every label
    has a bar, highest score first, with a tick at its threshold."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from test_multilabel_predict import LABELS, make_multilabel_artifact

    image = photo(tmp_path / "chelsea.jpg")
    probe = Classifier.load(make_multilabel_artifact(tmp_path / "probe", [0.5] * 3), device="cpu", precision="fp32")
    scores = probe.predict(str(image))["probabilities"]
    ranked = sorted(LABELS, key=scores.__getitem__, reverse=True)
    # thresholds that put the top label above and the others below, whatever the random weights give
    thresholds = [max(0.0, scores[c] - 0.01) if c == ranked[0] else min(1.0, scores[c] + 0.01) for c in LABELS]
    clf = Classifier.load(make_multilabel_artifact(tmp_path / "model", thresholds), device="cpu", precision="fp32")
    with serving(create_app(clf, ServeSettings())) as url:
        driver.get(f"{url}/")
        WebDriverWait(driver, WAIT_S).until(lambda d: "multi-label" in d.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "file-input").send_keys(str(image))
        WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "prediction").text == ranked[0]
        rows = driver.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
        assert [r.find_element(By.CLASS_NAME, "bar-label").text for r in rows] == ranked
        assert ["above" in r.get_attribute("class") for r in rows] == [True, False, False]
        for r in rows:
            label = r.find_element(By.CLASS_NAME, "bar-label").text
            tick = r.find_element(By.CLASS_NAME, "bar-threshold")
            assert tick.get_attribute("style") == f"left: {thresholds[LABELS.index(label)] * 100:.1f}%;"
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
