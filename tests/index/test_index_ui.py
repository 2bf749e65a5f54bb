"""The web page (``/ui``) and what it reads: the item read ``points/get``, images and the report served
only from under their roots, and the page itself driven in a real headless Chromium (Playwright).

The gallery mirrors the demo's: ``old`` holds every item as embedded by v1, ``new`` every item as
embedded by v3 (a full backfill), ``mixed`` v1 items of which a third were upgraded to v3 (v3 queries
reach v1 through v3 → v2 → v1). Items name their thumbnails (PNGs under the image root); one item's
metadata holds markup that must stay text.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from compatembed_index.api import IndexService
from compatembed_index.client import IndexClient
from compatembed_index.errors import CollectionNotFoundError, InvalidInputError, LimitExceededError
from compatembed_index.server import create_app
from compatembed_index.settings import IndexSettings
from compatembed_index.ui import CSP, STATIC

from index_helpers import Chain, ServedApp, write_version

KEY = "ui-s3cret"
N = 40
UPGRADED = list(range(0, N, 3))  # in `mixed`, these items hold v3 vectors
XSS = 6  # the item whose metadata holds markup (a v3 item of `mixed`: its own top hit)
SCRIPT = "<script>window.__pwned = 1</script>"
IMG = '<img src=x onerror="window.__pwned = 2">'


def _png(path: Path, colour: tuple[int, int, int], size: int = 12) -> None:
    from PIL import Image

    Image.new("RGB", (size, size), colour).save(path)


def _metadata(i: int) -> dict:
    if i == XSS:
        return {"class": SCRIPT, "note": IMG, "image": "../outside.png"}
    return {"class": f"c{i % 4}", "label": i % 4, "image": f"{i}.png"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    chain = Chain(root / "versions")
    images, report = root / "images", root / "report"
    images.mkdir()
    (images / "sub").mkdir()
    report.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        _png(images / f"{i}.png", tuple(int(c) for c in rng.integers(0, 255, 3)))
    _png(root / "outside.png", (255, 0, 0))
    (images / "escape.png").symlink_to(root / "outside.png")  # a link out of the root
    _png(root / "inside_target.png", (0, 0, 255))
    (images / "page.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    (images / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 5000)
    _png(report / "plot.png", (0, 128, 0), size=40)
    (report / "report.md").write_text(
        "# Compatibility report\n\nA **bold** claim with `code` and " + SCRIPT + ".\n\n"
        "| query | gallery | top-1 |\n|---|---|---:|\n| v3 | v1 | 42.0 |\n\n- one\n- two\n\n![the plot](plot.png)\n"
        "![escape](../outside.png)\n")

    svc = IndexService(root / "data", max_k=50, max_batch=100)
    for d in chain.dirs.values():
        svc.register_version(d)
    # a BCT-like pair whose names sort against their age: an identity edge routes queries both ways
    svc.register_version(write_version(root / "versions", "zz_old", Chain.D1))
    svc.register_version(write_version(root / "versions", "aa_new", Chain.D1, parent="zz_old", identity="zz_old"))
    for name, version in (("bct_old", "zz_old"), ("bct_mixed", "zz_old")):
        svc.create_collection(name)
        svc.add(name, version, np.arange(10), rng.normal(size=(10, Chain.D1)))
    svc.upgrade("bct_mixed", "aa_new", [0, 1, 2], rng.normal(size=(3, Chain.D1)))
    ids = np.arange(N)
    x1, x3 = rng.normal(size=(N, Chain.D1)), rng.normal(size=(N, Chain.D3))
    meta = [_metadata(i) for i in range(N)]
    for name in ("old", "new", "mixed"):
        svc.create_collection(name)
    svc.add("old", "v1", ids, x1, meta)
    svc.add("new", "v3", ids, x3, meta)
    svc.add("mixed", "v1", ids, x1, meta)
    svc.upgrade("mixed", "v3", UPGRADED, x3[UPGRADED])
    svc.set_alias("photos", "mixed")
    settings = IndexSettings(api_key=KEY, image_root=images, report_dir=report, max_k=50, max_batch=100,
                             max_image_bytes=4096)
    with ServedApp(create_app(svc, settings), settings) as url:
        yield url, svc, root
    svc.close()


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0], timeout=30) as c:
        yield c


# -- the item read (an API route, in the OpenAPI document) -----------------------------------------

def test_points_get_returns_stored_vectors_and_searching_with_one_finds_the_item(served, http):
    _, svc, _ = served
    r = http.post("/collections/mixed/points/get", json={"ids": [3, 4, 10_000]})
    assert r.status_code == 200, r.text
    p3, p4, absent = r.json()["points"]
    assert absent is None
    assert (p3["id"], p3["version"], p4["version"]) == (3, "v3", "v1")
    assert p4["metadata"] == _metadata(4)
    assert len(p3["vector"]) == Chain.D3 and len(p4["vector"]) == Chain.D1
    # the stored vector, exactly (float32, normalised at add): searching with it finds the item first
    binary = http.post("/collections/mixed/points/get", json={"ids": [3], "binary": True}).json()["points"][0]
    v = np.frombuffer(base64.b64decode(binary["vector_b64"]), dtype="<f4")
    np.testing.assert_array_equal(v, np.asarray(p3["vector"], dtype=np.float32))
    assert abs(float(np.linalg.norm(v)) - 1) < 1e-5
    hits = svc.search("mixed", "v3", v[None], k=1).hits(0)
    assert hits[0]["id"] == 3 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    bare = http.post("/collections/mixed/points/get", json={"ids": [3], "include_vectors": False,
                                                           "include_metadata": False}).json()["points"][0]
    assert bare == {"id": 3, "version": "v3"}


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"ids": [1, 1]}, 400, "InvalidInputError"),
    ({"ids": []}, 400, "InvalidInputError"),
    ({"ids": [-1]}, 400, "InvalidInputError"),
    ({"ids": list(range(101))}, 413, "LimitExceededError"),
    ({"ids": ["1"]}, 422, "ValidationError"),
    ({"ids": [1], "vectors": True}, 422, "ValidationError"),
])
def test_points_get_refuses_bad_requests_in_the_api_style(http, body, status, error):
    r = http.post("/collections/mixed/points/get", json=body)
    assert r.status_code == status and r.json()["error"] == error, r.text


def test_points_get_unknown_collection_is_404_and_documented(http):
    r = http.post("/collections/nope/points/get", json={"ids": [1]})
    assert r.status_code == 404 and r.json()["error"] == "CollectionNotFoundError"
    op = http.get("/openapi.json").json()["paths"]["/collections/{name}/points/get"]["post"]
    assert {"200", "400", "404", "408", "413", "422", "500", "503"} <= set(op["responses"])
    assert "security" not in op  # a read: no key
    assert not any(p.startswith("/ui") for p in http.get("/openapi.json").json()["paths"])


def test_points_get_bounds_the_answer_size(tmp_path):
    from compatembed_index.limits import Limits

    chain = Chain(tmp_path / "versions")
    with IndexService(None, limits=Limits(max_response_bytes=2000)) as svc:
        svc.register_version(chain.dirs["v3"])
        svc.create_collection("g")
        svc.add("g", "v3", np.arange(10), np.random.default_rng(0).normal(size=(10, Chain.D3)))
        assert svc.get_points("g", [0])[0]["vector"].shape == (Chain.D3,)
        with pytest.raises(LimitExceededError, match="max_response_bytes"):
            svc.get_points("g", np.arange(10))
        assert len(svc.get_points("g", np.arange(10), include_vectors=False)) == 10


def test_client_get_points_equals_the_service(served):
    url, svc, _ = served
    with IndexClient(url) as c:
        remote = c.get_points("mixed", [0, 1, 99])
        local = svc.get_points("mixed", [0, 1, 99])
        assert remote[2] is None and local[2] is None
        for a, b in zip(remote[:2], local[:2]):
            assert (a["id"], a["version"], a["metadata"]) == (b["id"], b["version"], b["metadata"])
            assert a["vector"].dtype == np.float32
            np.testing.assert_array_equal(a["vector"], b["vector"])
        with pytest.raises(CollectionNotFoundError):
            c.get_points("nope", [1])
        with pytest.raises(InvalidInputError):
            c.get_points("mixed", [1, 1])


# -- files: only images, only from under their root ------------------------------------------------

def test_images_are_served_from_the_root_with_their_type(http):
    r = http.get("/ui/image", params={"path": "5.png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff" and "sandbox" in r.headers["content-security-policy"]
    assert r.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(("path", "status", "error"), [
    ("../outside.png", 400, "InvalidInputError"),
    ("a/../../outside.png", 400, "InvalidInputError"),
    ("..", 400, "InvalidInputError"),
    ("/etc/passwd", 400, "InvalidInputError"),
    ("..\\outside.png", 400, "InvalidInputError"),
    ("", 400, "InvalidInputError"),
    ("x\x00.png", 400, "InvalidInputError"),
    ("escape.png", 403, "ForbiddenError"),  # a symlink that leads out of the root
    ("page.svg", 415, "UnsupportedMediaTypeError"),  # SVG can carry scripts: never served
    ("big.png", 413, "LimitExceededError"),
    ("missing.png", 404, "NotFoundError"),
    (".", 400, "InvalidInputError"),  # the root itself
    ("sub", 404, "NotFoundError"),  # a directory, not a file
])
def test_image_paths_that_leave_the_root_or_are_not_images_are_refused(http, path, status, error):
    r = http.get("/ui/image", params={"path": path})
    assert r.status_code == status, (path, r.status_code, r.text)
    assert r.json()["error"] == error
    assert str(Path.cwd()) not in r.text and "/tmp/" not in r.text  # no server path in the message


def test_a_symlink_inside_the_root_is_followed(served, http):
    _, _, root = served
    link = root / "images" / "inner.png"
    if not link.exists():
        link.symlink_to(root / "images" / "3.png")
    assert http.get("/ui/image", params={"path": "inner.png"}).status_code == 200


def test_report_text_and_its_plots(http):
    r = http.get("/ui/report/report.md")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert SCRIPT in r.text  # served as text; the page renders it as text
    assert http.get("/ui/report/file", params={"path": "plot.png"}).headers["content-type"] == "image/png"
    assert http.get("/ui/report/file", params={"path": "report.md"}).status_code == 415
    assert http.get("/ui/report/file", params={"path": "../outside.png"}).status_code == 400


def test_without_roots_no_file_is_served(tmp_path):
    from fastapi.testclient import TestClient

    with IndexService(None) as svc:
        c = TestClient(create_app(svc, IndexSettings()))
        assert c.get("/ui/image", params={"path": "a.png"}).status_code == 404
        assert c.get("/ui/report/report.md").status_code == 404
        assert c.get("/ui/api/info").json() == {"write_key": False, "images": False, "report": False, "max_k": 1000}


def test_settings_refuse_a_root_that_is_not_a_directory(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a directory"):
        IndexSettings(image_root=tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValidationError, match="not a directory"):
        IndexSettings(report_dir=tmp_path / "f")


def test_cli_serve_takes_the_roots(tmp_path):
    from compatembed_index.cli import _settings, build_parser

    args = build_parser().parse_args(["serve", "--image-root", str(tmp_path), "--report-dir", str(tmp_path)])
    s = _settings(args)
    assert s.image_root == tmp_path and s.report_dir == tmp_path


# -- the page's own files ----------------------------------------------------------------------------

def test_page_and_assets_carry_a_strict_csp(http):
    r = http.get("/ui", follow_redirects=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == CSP and "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert http.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/ui/static/../server.py").status_code == 404
    assert http.get("/ui/static/index.html").status_code == 404  # only the listed assets


def test_the_page_never_parses_data_as_html():
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and " on" not in html.split("<body>")[1].replace("\n", " ").lower().split(">")[0]


# -- the page in a real browser ----------------------------------------------------------------------

def _chromium() -> str | None:
    for name in (os.environ.get("COMPATEMBED_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; it is in the dev extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set COMPATEMBED_CHROMIUM); make test installs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    url = served[0]
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    response = pg.goto(url + "/ui/")
    assert response is not None and response.headers["content-security-policy"] == CSP
    pg.wait_for_selector("body[data-ready=true]", timeout=20_000)
    yield pg
    ctx.close()
    assert not errors, errors


def _cards(scope) -> list[tuple[int, str]]:
    return [(int(c.get_attribute("data-id")), c.query_selector(".badge").inner_text())
            for c in scope.query_selector_all(".card")]


def _api_hits(url: str, collection: str, version: str, vector_b64: str, dim: int, k: int = 8) -> list[tuple[int, str]]:
    body = {"version": version, "vectors_b64": {"shape": [1, dim], "data": vector_b64}, "k": k, "allow_partial": True}
    r = httpx.post(f"{url}/collections/{collection}/search", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return [(h["id"], h["version"]) for h in r.json()["results"][0]]


def _stored(url: str, collection: str, item: int) -> dict:
    r = httpx.post(f"{url}/collections/{collection}/points/get", json={"ids": [item], "binary": True}, timeout=30)
    return r.json()["points"][0]


def test_page_lists_collections_versions_routes_and_backfill(page, served):
    _, svc, _ = served
    rows = page.query_selector_all("#collections tr[data-collection]")
    assert [r.get_attribute("data-collection") for r in rows] == svc.list_collections()
    assert page.eval_on_selector("#collection", "s => s.value") == "mixed"  # the alias's collection first
    mixed = page.inner_text("#collections tr[data-collection=mixed]")
    up = len(UPGRADED)
    assert f"{up} ({100 * up / N:.1f}%)" in mixed  # upgraded to v3
    assert f"{N - up} ({100 * (N - up) / N:.1f}%)" in mixed  # v1 items still to backfill
    nodes = page.query_selector_all("#graph svg g[data-version]")
    assert sorted(n.get_attribute("data-version") for n in nodes) == ["aa_new", "v0", "v1", "v2", "v3", "zz_old"]
    assert page.query_selector_all("#graph svg path.edge.forward")  # the forward edge v1 → v3
    v3_row = page.inner_text("#routes tr[data-query-version=v3]")
    assert "query route v3 › v2 › v1" in v3_row and "direct" in v3_row
    assert "no route" in page.inner_text("#routes tr[data-query-version=v0]")


def test_more_like_this_shows_the_api_results_with_thumbnails(page, served, tmp_path):
    url = served[0]
    page.fill("#item-id", "3")  # a v3 item of the mixed gallery
    page.click("#item-search")
    page.wait_for_selector("#results[data-query='item #3'] .card")
    shown = _cards(page.query_selector("#results"))
    stored = _stored(url, "mixed", 3)
    assert shown == _api_hits(url, "mixed", "v3", stored["vector_b64"], Chain.D3)
    assert {v for _, v in shown} == {"v1", "v3"}  # both segments answer
    assert shown[0] == (3, "v3")
    page.wait_for_function("() => [...document.querySelectorAll('#results img.thumb')].every(i => i.complete)")
    loaded = page.eval_on_selector_all("#results img.thumb", "imgs => imgs.map(i => i.naturalWidth)")
    assert loaded and all(w == 12 for w in loaded)
    assert "v3: direct" in page.inner_text("#search-routes") and "query:v3>v2>v1" in page.inner_text("#search-routes")
    shot = tmp_path / "ui_search.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_side_by_side_old_new_and_mixed(page, served, tmp_path):
    url = served[0]
    page.fill("#item-id", "4")  # a v1 item in mixed; its v3 vector is in `new`
    page.click("#item-search")
    page.wait_for_selector("#results[data-query='item #4'] .card")
    # stored as v1 in mixed, where v1 cannot reach the v3 segment: "more like this" takes its v3 vector
    assert "v1: query:v3>v2>v1" in page.inner_text("#search-routes") and "skipped" not in page.inner_text("#search-routes")
    assert "stored as v1 in mixed" in page.inner_text("#query")
    columns = page.eval_on_selector_all(
        "#columns .column-editor", "rows => rows.map(r => [r.querySelector('.column-version').value, "
        "r.querySelector('.column-collection').value])")
    assert columns == [["v1", "old"], ["v3", "old"], ["v3", "mixed"], ["v3", "new"]]
    page.click("#compare-run")
    page.wait_for_function("() => { const c = document.querySelectorAll('#compare .column');"
                           " return c.length === 4 && [...c].every(x => x.querySelector('.results, .error')); }")
    old_v1, new_v3 = _stored(url, "old", 4)["vector_b64"], _stored(url, "new", 4)["vector_b64"]
    expected = [("old", "v1", old_v1, Chain.D1), ("old", "v3", new_v3, Chain.D3), ("mixed", "v3", new_v3, Chain.D3),
                ("new", "v3", new_v3, Chain.D3)]
    for i, (coll, version, b64, dim) in enumerate(expected):
        col = page.query_selector(f"#compare .column[data-index='{i}']")
        assert col.get_attribute("data-collection") == coll and col.get_attribute("data-version") == version
        assert _cards(col) == _api_hits(url, coll, version, b64, dim), (coll, version)
    assert {v for _, v in _cards(page.query_selector("#compare .column[data-index='0']"))} == {"v1"}
    assert {v for _, v in _cards(page.query_selector("#compare .column[data-index='2']"))} == {"v1", "v3"}
    assert "v1: query:v3>v2>v1" in page.inner_text("#compare .column[data-index='1'] .routes-line")
    page.screenshot(path=str(tmp_path / "ui_compare.png"), full_page=True)


def test_side_by_side_defaults_follow_the_declared_edges_not_the_names(page):
    page.select_option("#collection", "bct_mixed")
    columns = page.eval_on_selector_all(
        "#columns .column-editor", "rows => rows.map(r => [r.querySelector('.column-version').value, "
        "r.querySelector('.column-collection').value])")
    assert columns == [["zz_old", "bct_old"], ["aa_new", "bct_old"], ["aa_new", "bct_mixed"]]
    order = page.eval_on_selector_all("#graph svg g[data-version]", "gs => gs.map(g => g.getAttribute('data-version'))")
    assert order.index("zz_old") < order.index("aa_new") and order.index("v1") < order.index("v2") < order.index("v3")


def test_search_with_an_uploaded_npy_vector(page, served, tmp_path):
    url = served[0]
    q = np.random.default_rng(5).normal(size=(2, Chain.D3)).astype(np.float32)
    np.save(tmp_path / "query.npy", q)
    page.set_input_files("#vector-file", str(tmp_path / "query.npy"))
    page.wait_for_function("() => document.querySelector('#file-version').options.length === 1")
    assert page.eval_on_selector("#file-version", "s => s.value") == "v3"  # the only 32-d version
    page.click("#file-search")
    page.wait_for_selector("#results[data-query='query.npy (row 0 of 2)'] .card")
    b64 = base64.b64encode(q[0].astype("<f4").tobytes()).decode()
    assert _cards(page.query_selector("#results")) == _api_hits(url, "mixed", "v3", b64, Chain.D3)


def test_a_bad_vector_file_says_why(page, tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(32, dtype=np.int64))
    page.set_input_files("#vector-file", str(tmp_path / "ints.npy"))
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "float32 (<f4) or float64 (<f8)" in page.inner_text("#status")


def test_markup_in_metadata_and_report_is_shown_as_text_and_never_runs(page):
    page.fill("#item-id", str(XSS))
    page.click("#item-search")
    page.wait_for_selector(f"#results[data-query='item #{XSS}'] .card")
    card = page.query_selector(f"#results .card[data-id='{XSS}']")
    text = card.inner_text()
    assert SCRIPT in text and "onerror" in text  # the markup, as text
    assert card.query_selector("script") is None and page.query_selector("#results img[src=x]") is None
    assert card.query_selector(".thumb.placeholder") is not None  # its image path has '..': no image
    assert SCRIPT in page.inner_text("#query")  # the query's own card and metadata too
    page.wait_for_selector("#report-section:not([hidden]) table")
    assert SCRIPT in page.inner_text("#report")
    assert page.evaluate("() => window.__pwned") is None
    assert page.query_selector("#report script") is None


def test_the_report_is_rendered_with_its_plots(page):
    page.wait_for_selector("#report-section:not([hidden]) table")
    assert page.inner_text("#report h2") == "Compatibility report"
    assert page.inner_text("#report table").count("42.0") == 1
    assert page.inner_text("#report strong") == "bold"
    page.wait_for_function("() => { const i = document.querySelector('#report img'); return i && i.complete; }")
    assert page.eval_on_selector("#report img", "i => i.naturalWidth") == 40
    assert page.query_selector("#report img[alt=escape]") is None  # a path with '..' is not even asked for


def test_writes_from_the_page_need_the_key(page):
    page.click("#snapshot")
    page.wait_for_function("() => document.querySelector('#write-status').textContent.includes('401')")
    assert "UnauthorizedError" in page.inner_text("#write-status")
    page.fill("#api-key", KEY)
    page.click("#snapshot")
    page.wait_for_function("() => document.querySelector('#write-status').textContent.startsWith('snapshot ')")
    assert "snapshots/mixed/" in page.inner_text("#write-status")
