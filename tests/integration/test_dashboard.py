"""The dashboard and the API docs in headless Chromium against the live server. Dashboard (after
jobs ran): uPlot charts hold data points, have time axes and show values on hover; the job table
lists those jobs, with each finished job's thumbnail (also with API keys on, where the page
fetches it with the key). /docs and /redoc render from the package's own assets. Nothing is loaded from
another host. Screenshots land in test-artifacts/ (dashboard.png, docs.png, redoc.png)."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from genserve.bench.live import LiveServer, wait_for, wait_until

from .conftest import catalog

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("GENSERVE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="genserve-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,2000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_shows_live_data_in_chromium(browser, obs_client):
    ran = [obs_client.post("/v1/jobs", json={"model": "demo-image", "prompt": f"dash {i}", "steps": 2}).json()["id"]
           for i in range(4)]
    ran.append(obs_client.post("/v1/jobs", json={"model": "demo-video", "prompt": "dash video", "steps": 2}).json()["id"])
    done = [wait_for(obs_client, j) for j in ran]
    assert all(j["status"] == "succeeded" for j in done)
    # A job is charged when its batch ends, just after it succeeds: wait for the charges, so the
    # dashboard's first refresh already sees the cost.
    for j in ran:
        wait_until(lambda: obs_client.get(f"/v1/jobs/{j}").json()["cost"]["device_seconds"] is not None, 30,
                   what=f"job {j} to be charged")
    base = str(obs_client.base_url).rstrip("/")
    browser.get(base + "/dashboard")

    def page(script):
        return browser.execute_script(script)

    try:
        wait_until(lambda: int(page("return document.body.dataset.refreshed || 0")) >= 1, 60,
                   what="a successful dashboard refresh", every=0.2)
    except AssertionError as e:
        status = page("return document.getElementById('status').textContent")
        raise AssertionError(f"{e}; dashboard status: {status}") from None
    charts = page("""return Array.from(document.querySelectorAll('.chart')).map(f => [f.id, Number(f.dataset.points),
        Number(f.dataset.max), f.querySelectorAll('.uplot canvas').length, f.querySelectorAll('.u-axis').length])""")
    by_id = {c[0]: c[1:] for c in charts}
    assert len(by_id) == 7, charts
    for cid, (points, _max, canvases, axes) in by_id.items():
        assert points > 0 and canvases >= 1 and axes == 2, (cid, points, canvases, axes)
    assert by_id["chart-throughput"][1] > 0 and by_id["chart-latency"][1] > 0 and by_id["chart-utilization"][1] > 0
    assert by_id["chart-cost"][1] > 0
    # The time axis has tick labels, and hovering shows the values under the cursor in the legend.
    # (uPlot draws tick labels on the canvas; its instance keeps the labels it drew.)
    ticks = page("return window.genservePlots['chart-queue'].axes[0]._values")
    assert len(ticks) >= 2 and all(":" in str(t) for t in ticks), ticks  # wall-clock times: 11:36, 11:37, …
    # Every value axis is wide enough for its labels, which are distinct and read plainly: at a
    # realistic price the cost axis (about 1e-5 $ per inference) once drew "2.00e-5" in 52 px and
    # showed ".00e-5", and ticks of 0.002 all read "0.00" (issue 22, item 10). The drawn axes, then
    # the cost axis's own label and size functions over such small ticks.
    fit = """const a = u.axes[1]; u.ctx.font = a.font[0];
        const text = Math.max(0, ...labels.map(v => u.ctx.measureText(v).width)) / devicePixelRatio;
        return [labels, text + a.ticks.size + a.gap, size];"""
    axes = page(f"""return Object.fromEntries(Object.entries(window.genservePlots).map(([id, u]) => {{
        const labels = u.axes[1]._values, size = u.axes[1]._size; return [id, (() => {{ {fit} }})()]; }}))""")
    axes["small cost ticks"] = page(f"""const u = window.genservePlots['chart-cost'];
        const labels = u.axes[1].values(u, [0, 1e-5, 2e-5, 3e-5], 1, 50, 1e-5);
        const size = u.axes[1].size(u, labels, 1, 0); {fit}""")
    for cid, (labels, needed, size) in axes.items():
        assert len(labels) >= 2 and len(set(labels)) == len(labels) and needed <= size, (cid, labels, needed, size)
        assert not any("e-" in v or v.startswith(".") for v in labels), (cid, labels)
    assert axes["small cost ticks"][0] == ["0", "10µ", "20µ", "30µ"], axes["small cost ticks"]
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(browser.find_element("css selector", "#chart-throughput .u-over")).perform()
    legend = wait_until(lambda: (lambda v: v if v[0] not in ("--", "") else None)(
        page("return Array.from(document.querySelectorAll('#chart-throughput .u-legend .u-value')).map(v => v.textContent)")),
        10, what="hover values in the legend")
    assert len(legend) == 2 and legend[1] not in ("--", ""), legend
    rows = page("return Array.from(document.querySelectorAll('#jobs tbody tr')).map(r => r.dataset.jobId)")
    assert set(ran) <= set(rows), (ran, rows)
    bars = page(f"""return document.querySelector('#jobs tr[data-job-id="{ran[0]}"] .bar').children.length""")
    assert bars >= 2  # at least queue wait/inference segments of the breakdown
    assert_thumbnails_load(browser, ran, {j["id"]: j["results"][0]["thumbnail_url"] for j in done})
    workers = page("return Array.from(document.querySelectorAll('#workers tbody tr')).map(r => r.textContent)")
    assert len(workers) == 1 and "demo-image" in workers[0]
    models = page("return Array.from(document.querySelectorAll('#models tbody tr td:first-child')).map(c => c.textContent)")
    assert {"demo-image", "demo-video"} <= set(models)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert_no_outside_requests(browser, base)


def assert_thumbnails_load(browser, job_ids: list[str], thumbnail_urls: dict[str, str]) -> None:
    """Each finished job's row shows its thumbnail: fetched (lazily, once the table is in view)
    from the job's ``thumbnail_url`` and decoded by the browser (naturalWidth > 0)."""
    browser.execute_script("document.getElementById('jobs').scrollIntoView()")

    def loaded():
        got = browser.execute_script("""return Object.fromEntries(arguments[0].map(id => {
            const img = document.querySelector(`#jobs tr[data-job-id="${id}"] td.thumb img`);
            return [id, img ? [img.dataset.state, img.dataset.thumb, img.complete, img.naturalWidth,
                               img.naturalHeight] : null];
        }))""", job_ids)
        return got if all(v and v[0] == "loaded" and v[2] and v[3] > 0 for v in got.values()) else None

    got = wait_until(loaded, 30, what="every job's thumbnail to load", every=0.2)
    for job_id, (_state, url, _complete, w, h) in got.items():
        assert url == thumbnail_urls[job_id]
        assert (w, h) == (64, 64)  # the demo models' default size: under 256 px, not scaled


def test_dashboard_thumbnails_with_api_keys(browser, demo_models, tmp_path):
    """With keys on, a thumbnail URL answers 401 to a request without the key (what a plain
    ``<img src>`` would send); the dashboard opened as /dashboard#key=… still shows it."""
    data = tmp_path / "data"
    made = subprocess.run([sys.executable, "-m", "genserve.cli", "keys", "create", "--tenant", "ops", "--scope",
                           "admin", "--data-dir", str(data)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    with LiveServer(data, catalog(demo_models), workers=1) as srv, \
            httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        jid = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "keyed", "steps": 2}).json()["id"]
        done = wait_for(c, jid)
        url = done["results"][0]["thumbnail_url"]
        assert httpx.get(url).status_code == 401 and c.get(url).status_code == 200
        browser.get(f"{srv.url}/dashboard#key={key}")
        try:
            wait_until(lambda: int(browser.execute_script("return document.body.dataset.refreshed || 0")) >= 1, 60,
                       what="a successful dashboard refresh", every=0.2)
        except AssertionError as e:
            status = browser.execute_script("return document.getElementById('status').textContent")
            raise AssertionError(f"{e}; dashboard status: {status}") from None
        assert_thumbnails_load(browser, [jid], {jid: url})


def assert_no_outside_requests(browser, base: str) -> None:
    """Every resource the page loaded came from the server itself."""
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(base + "/") for u in urls), urls


@pytest.mark.parametrize("path, ready", [
    ("/docs", "return document.querySelectorAll('.swagger-ui .opblock').length"),
    ("/redoc", "return document.querySelectorAll('[data-section-id]').length"),
])
def test_api_docs_render_offline(browser, obs_client, path, ready):
    base = str(obs_client.base_url).rstrip("/")
    r = obs_client.get(path)
    html = r.text
    assert "cdn.jsdelivr" not in html and "fonts.googleapis" not in html and "/static/" in html
    assert "img-src 'self'" in r.headers["content-security-policy"]
    browser.get(base + path)
    count = wait_until(lambda: browser.execute_script(ready), 60, what=f"{path} to render", every=0.2)
    text = browser.execute_script("return document.body.innerText")
    assert count >= 5 and "/v1/jobs" in text, (count, text[:300])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{path.strip('/')}.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert_no_outside_requests(browser, base)
