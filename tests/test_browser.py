"""The dashboard and the run report in a real headless Chromium, opened from file://.

Needs Debian's ``chromium`` and ``chromium-driver`` and selenium from PyPI (``make setup``
installs them when it can). Without them the tests skip with one line, except under ``CI``,
where they fail: the browser checks must run there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
DRIVER = shutil.which("chromedriver")
#: set to a folder to keep the screenshots (the docs' images are made this way)
SHOTS = os.environ.get("SAELAB_SCREENSHOTS", "")


def _need_browser():
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if CHROMIUM is None:
        missing.append("chromium (apt-get install chromium)")
    if DRIVER is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        msg = "browser tests need " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI: these tests must run)")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,860",
                 "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shot(driver, tmp_path: Path, name: str) -> Path:
    path = Path(SHOTS) / name if SHOTS else tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


WORDS = ["the", "market", "shares", "bank", "rose", "fell", "said", "minister", "police", "court",
         "football", "match", "goal", "season", "rain", "storm", "film", "music", "</script>",
         "a & b", "<b>x</b>", "\n", "prices", "oil"]


class _WordTok:
    def decode(self, ids):
        return " " + WORDS[int(ids[0]) % len(WORDS)]


@pytest.fixture(scope="module")
def dashboard_file(tmp_path_factory):
    from saelab.report.dashboard import (
        DashboardConfig,
        DashboardMeta,
        TensorRows,
        TokenText,
        collect,
        latent_records,
    )
    from saelab.report.html import dashboard_html

    g = torch.Generator().manual_seed(0)
    W, T, D, F = 40, 24, 16, 30
    windows = torch.randint(0, len(WORDS), (W, T), generator=g)
    win = torch.arange(W).repeat_interleave(T - 1)
    pos = torch.arange(1, T).repeat(W)
    x = torch.randn(len(win), D, generator=g)
    enc = torch.randn(D, F, generator=g)

    def encode(x_BD):  # signed: both poles get examples
        pre = x_BD @ enc
        return torch.sign(pre) * torch.relu(pre.abs() - 2.0)

    data = collect(encode, F, TensorRows(x, win, pos, windows), DashboardConfig(latents="all"))
    V = len(WORDS)
    data.logits = {"pos_ids": torch.randint(0, V, (F, 10), generator=g),
                   "pos_vals": torch.rand(F, 10, generator=g).sort(1, descending=True).values,
                   "neg_ids": torch.randint(0, V, (F, 10), generator=g),
                   "neg_vals": -torch.rand(F, 10, generator=g),
                   "hist_counts": torch.randint(0, 9, (F, 40), generator=g),
                   "hist_lo": -torch.ones(F), "hist_hi": torch.ones(F)}
    meta = DashboardMeta(model="planted", hook="blocks.0.hook_resid_post", architecture="abstopk",
                         d_sae=F, dataset="planted words", logit_lens="W_dec[i] @ W_U^T")
    recs = latent_records(data, TokenText(_WordTok()), meta)
    out = tmp_path_factory.mktemp("dash") / "dashboard.html"
    out.write_text(dashboard_html(recs, meta, data))
    return out, recs


def test_dashboard_in_chromium(browser, dashboard_file, tmp_path):
    from selenium.webdriver.common.by import By

    path, recs = dashboard_file
    browser.get(path.as_uri())
    assert _errors(browser) == []
    rows = browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")
    assert len(rows) == len(recs)
    assert [int(r.get_attribute("data-i")) for r in rows] == sorted(r["index"] for r in recs)
    _shot(browser, tmp_path, "dashboard_index.png")

    # sort by max activation (descending on the first click)
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="max"]').click()
    shown = [int(r.get_attribute("data-i")) for r in
             browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")]
    by_max = [r["index"] for r in sorted(recs, key=lambda r: (-r["max"], r["index"]))]
    assert shown == by_max

    # the search box filters on the text of the latents' top tokens
    word = recs[3]["top_tokens"][0].strip()
    expect = {r["index"] for r in recs
              if any(word.lower() in t.lower() for t in r["top_tokens"])}
    box = browser.find_element(By.ID, "search")
    box.send_keys(word)
    shown = {int(r.get_attribute("data-i")) for r in
             browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")}
    assert recs[3]["index"] in shown and shown <= expect and len(shown) < len(recs) + 1
    box.clear()
    box.send_keys("zzz-no-such-token")
    assert browser.find_elements(By.CSS_SELECTOR, "#index tbody tr") == []
    box.clear()
    box.send_keys(" ")  # input event with an empty query: everything back
    assert len(browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")) == len(recs)

    # open a latent: examples with highlighted tokens and the logit table
    lat = recs[3]["index"]
    browser.find_element(By.CSS_SELECTOR, f'#index tbody tr[data-i="{lat}"]').click()
    card = browser.find_element(By.ID, "latent-card")
    assert card.get_attribute("data-latent") == str(lat)
    examples = card.find_elements(By.CSS_SELECTOR, ".examples .ex")
    assert len(examples) == sum(len(s["top"]) for s in recs[3]["sides"])
    lit = card.find_elements(By.CSS_SELECTOR, ".examples .tok.center")
    assert lit and all("rgba(" in t.get_attribute("style") for t in lit)
    first = recs[3]["sides"][0]["top"][0]
    assert card.find_elements(By.CSS_SELECTOR, ".examples .ex")[0].text.replace("\n", "").find(
        "".join(first["tokens"]).replace("\n", "\u21b5").strip()[:8]) >= 0
    logit_rows = card.find_elements(By.CSS_SELECTOR, "table.logits tbody tr")
    assert len(logit_rows) == 20
    # markup in token text is shown as text, never parsed
    assert browser.find_elements(By.CSS_SELECTOR, "#card b") == []
    assert _errors(browser) == []
    _shot(browser, tmp_path, "dashboard_card.png")

    # a link to #latent-N opens that card directly
    browser.get(path.as_uri() + f"#latent-{recs[5]['index']}")
    assert browser.find_element(By.ID, "latent-card").get_attribute("data-latent") == str(
        recs[5]["index"])


def test_report_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from saelab.report.plots import plot_density
    from saelab.report.run_report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(
        {"model": {"model": "embedded", "hook": "blocks.12.hook_resid_post"},
         "sae": {"architecture": "gated", "d_sae": 64}, "train": {"tokens": 1000}}))
    (run / "metrics.json").write_text(json.dumps({"l0": 12.5, "fvu": 0.2, "ce_loss_recovered":
                                                  0.9, "custom_thing": 3.0}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens": 100 * s, "loss": 10 / s, "l0": 50 / s, "fvu": 1 / s,
                    "dead_fraction": 0.01 * s}) + "\n" for s in range(1, 20)))
    plot_density(torch.rand(64) * 0.1, run / "feature_density.png")
    (run / "dashboard").mkdir()
    (run / "dashboard" / "dashboard.html").write_text("<!DOCTYPE html><title>d</title>")
    report = write_report(run)
    browser.get(report.as_uri())
    assert _errors(browser) == []
    for img in ("curves", "density"):
        el = browser.find_element(By.ID, img)
        assert int(browser.execute_script("return arguments[0].naturalWidth", el)) > 100
    text = browser.find_element(By.CSS_SELECTOR, "table.metrics").text
    assert "FVU" in text and "custom_thing" in text
    link = browser.find_element(By.ID, "dashboard-link")
    link.click()
    assert browser.current_url.endswith("dashboard/dashboard.html")
    browser.back()
    _shot(browser, tmp_path, "report.png")
