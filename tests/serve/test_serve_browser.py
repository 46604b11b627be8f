"""The page in real Chromium (Playwright, Debian's /usr/bin/chromium) against a real server with LiteMedSAM on the
demo lesions: the mask drawn on the page is the Predictor's mask for the same click; box, undo, propagate, save.

Screenshots land in docs/ (app-*.png) with ``SAMADAPT_SCREENSHOTS=docs``. Without Chromium the tests skip, except where ``SAMADAPT_REQUIRE_BROWSER``
is set (CI installs chromium in .ci/run and sets it): there a missing browser is a failure.
"""

import os
import tempfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from samadapt.data.io import read_label, read_volume
from samadapt.data.preprocess import preprocess_volume, volume_slice
from samadapt.predict import Predictor
from samadapt.serve import create_app
from tests.serve.conftest import running

CHROMIUM = Path("/usr/bin/chromium")
# screenshots for docs/ when asked (SAMADAPT_SCREENSHOTS=docs), else a temporary folder: a test run leaves the tree clean
DOCS = Path(os.environ.get("SAMADAPT_SCREENSHOTS") or tempfile.mkdtemp(prefix="samadapt-screens-"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PALETTE = {1: (0xE6, 0x19, 0x4B), 2: (0x3C, 0xB4, 0x4B)}
TOKEN = "browser-test-token"

pytestmark = pytest.mark.slow


def _browser_or_skip():
    required = bool(os.environ.get("SAMADAPT_REQUIRE_BROWSER"))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"{CHROMIUM} missing although SAMADAPT_REQUIRE_BROWSER is set (.ci/run installs it)")
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    return sync_playwright


@pytest.fixture(scope="module")
def server(demo_data, tmp_path_factory):
    """A real uvicorn server in a thread: LiteMedSAM, the demo datasets, a temporary --root, a token (as served by
    default); ``url`` is the address ``samadapt serve`` prints, with the token."""
    from samadapt.inference import load_predictor
    from samadapt.serve import Workspace, create_app

    root = tmp_path_factory.mktemp("root")
    workspace = Workspace(
        load_predictor("lite_medsam", device="cpu"),
        roots=[root],
        demo=demo_data,
        state_dir=tmp_path_factory.mktemp("state"),
        device="cpu",
    )
    with running(create_app(workspace, token=TOKEN)) as port:
        base = f"http://127.0.0.1:{port}"
        yield {"url": f"{base}/?token={TOKEN}", "base": base, "workspace": workspace, "root": root, "demo": demo_data}
    workspace.close()


@pytest.fixture(scope="module")
def chromium():
    """Playwright's Chromium launcher: one Playwright per module (its sync API runs one event loop per thread)."""
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        yield playwright.chromium


@pytest.fixture(scope="module")
def page(server, chromium):
    browser = chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(120_000)
    yield page
    browser.close()


def idle(page) -> None:
    page.wait_for_function("window.samadapt && window.samadapt.pending === 0")


def overlay(page) -> np.ndarray:
    """The label overlay as drawn: (H, W, 4) RGBA of the overlay canvas (opaque colours, shown at 45 %)."""
    data = page.evaluate(
        """() => { const c = document.querySelector('[data-testid=overlay]');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"""
    )
    size = page.evaluate("() => [window.samadapt.h, window.samadapt.w]")
    return np.array(data, np.uint8).reshape(*size, 4)


def drawn(page, value: int) -> np.ndarray:
    rgba = overlay(page)
    return (rgba[..., 3] > 0) & (rgba[..., :3] == PALETTE[value]).all(-1)


def at(page, x: int, y: int) -> dict:
    """Where pixel (x, y) of the slice is on the viewer element (its centre)."""
    box = page.get_by_test_id("viewer").bounding_box()
    h, w = page.evaluate("() => [window.samadapt.h, window.samadapt.w]")
    return {"x": (x + 0.5) * box["width"] / w, "y": (y + 0.5) * box["height"] / h}


def drag(page, start: tuple, end: tuple) -> None:
    """Drag the mouse over the viewer from slice pixel ``start`` (x, y) to ``end``."""
    origin = page.get_by_test_id("viewer").bounding_box()
    a, b = at(page, *start), at(page, *end)
    page.mouse.move(origin["x"] + a["x"], origin["y"] + a["y"])
    page.mouse.down()
    page.mouse.move(origin["x"] + (a["x"] + b["x"]) / 2, origin["y"] + (a["y"] + b["y"]) / 2, steps=3)
    page.mouse.move(origin["x"] + b["x"], origin["y"] + b["y"], steps=3)
    page.mouse.up()


def status(page) -> str:
    return page.get_by_test_id("status").inner_text()


def wait_status(page, prefix: str) -> str:
    page.wait_for_function("p => document.querySelector('[data-testid=status]').textContent.startsWith(p)", arg=prefix)
    idle(page)
    return status(page)


def open_at(page, url: str, image_path: Path, index: int) -> None:
    """Load the page, open the case ``image_path`` and show its slice ``index`` along axis 0."""
    page.goto(url)
    wait_status(page, "ready")
    page.get_by_test_id("case").select_option(str(image_path))
    page.get_by_test_id("open").click()
    wait_status(page, "opened")
    page.get_by_test_id("slice").fill(str(index))
    page.wait_for_function(f"window.samadapt.index === {index} && window.samadapt.raw !== null")
    idle(page)


def test_click_box_undo_propagate_save(server, page):
    demo = server["demo"]
    image_path = demo["lesions"] / "imagesTr" / "brain1.nrrd"
    lesion = read_label(demo["lesions"] / "labelsTr" / "brain1.nrrd").array > 0
    index = int(np.argmax(lesion.sum((1, 2))))
    inside = ndimage.distance_transform_edt(lesion[index])
    y, x = (int(v) for v in np.unravel_index(inside.argmax(), inside.shape))
    ys, xs = np.nonzero(lesion[index])

    open_at(page, server["url"], image_path, index)

    # the library's answer to the same click, on the same slice as training takes it
    volume = read_volume(image_path)
    preset = server["workspace"].session(page.evaluate("window.samadapt.sess.session")).preset
    plane = volume_slice(preprocess_volume(volume.array, preset), index, 0, preset)
    run = server["workspace"].run
    predictor = Predictor.for_run(run, "cpu")
    predictor.set_image(plane, preprocessed=True)
    click_mask = predictor.predict(points=np.array([[x, y]]), labels=np.array([1])).masks[0, 0]

    page.get_by_test_id("viewer").click(position=at(page, x, y))
    text = wait_status(page, "mask:")
    np.testing.assert_array_equal(drawn(page, 1), click_mask)  # LiteMedSAM learnt boxes: a lone click gives little
    assert f"mask: {int(click_mask.sum())} px" in text

    # a dragged box for the same object: the click and the box together
    page.get_by_test_id("mode-box").click()
    x0, y0, x1, y1 = int(xs.min()) - 4, int(ys.min()) - 4, int(xs.max()) + 4, int(ys.max()) + 4
    drag(page, (x0, y0), (x1, y1))
    wait_status(page, "mask:")
    both = predictor.predict(points=np.array([[x, y]]), labels=np.array([1]), boxes=np.array([x0, y0, x1, y1]))
    both_mask = both.masks[0, 0]
    np.testing.assert_array_equal(drawn(page, 1), both_mask)
    assert 2 * (both_mask & lesion[index]).sum() / (both_mask.sum() + lesion[index].sum()) > 0.6
    page.screenshot(path=str(DOCS / "app-box.png"))

    # a second object elsewhere, then undo it
    page.get_by_test_id("add-object").click()
    wait_status(page, "object 2 added")
    other = (x0 - 70, y0 + 20, x0 - 30, y0 + 60)
    drag(page, other[:2], other[2:])
    wait_status(page, "mask:")
    other_mask = predictor.predict(boxes=np.array(other)).masks[0, 0]
    np.testing.assert_array_equal(drawn(page, 2), other_mask)
    np.testing.assert_array_equal(drawn(page, 1), both_mask & ~other_mask)
    page.get_by_test_id("undo").click()
    wait_status(page, "undo")
    assert not drawn(page, 2).any()
    np.testing.assert_array_equal(drawn(page, 1), both_mask)

    # propagate object 1 through the volume, with progress
    page.get_by_test_id("object-1").click()
    page.get_by_test_id("propagate").click()
    text = wait_status(page, "propagated")
    session = server["workspace"].session(page.evaluate("window.samadapt.sess.session"))
    filled = [i for i in range(session.labels.shape[0]) if (session.labels[i] == 1).any()]
    assert len(filled) > 1 and index in filled, text
    assert page.get_by_test_id("progress").get_attribute("value") == page.get_by_test_id("progress").get_attribute(
        "max"
    )
    page.get_by_test_id("slice").fill(str(filled[-1]))
    page.wait_for_function(f"window.samadapt.index === {filled[-1]}")
    idle(page)
    page.screenshot(path=str(DOCS / "app-propagated.png"))

    # save, read back with nibabel: the input's grid and affine, the label values
    page.get_by_test_id("save-path").fill("brain1_browser.nii.gz")
    page.get_by_test_id("save").click()
    saved = wait_status(page, "saved ").removeprefix("saved ")
    assert Path(saved) == server["root"] / "labels" / "brain1_browser.nii.gz"
    image = nib.load(saved)
    assert image.shape == volume.array.shape[::-1]
    np.testing.assert_allclose(image.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), session.labels)
    assert set(np.unique(np.asarray(image.dataobj))) == {0, 1}
    stamp = Path(saved).stat().st_mtime_ns
    page.once("dialog", lambda dialog: dialog.dismiss())  # "exists; overwrite?" -> no
    page.get_by_test_id("save").click()
    assert "exists" in wait_status(page, "error:")
    assert Path(saved).stat().st_mtime_ns == stamp

    # another axis: the (Z, Y) plane of X = x, drawn with the head up when z runs that way; a click lands on its voxel
    page.get_by_test_id("mode-point").click()
    page.get_by_test_id("axis").select_option("2")
    page.wait_for_function("window.samadapt.axis === 2 && window.samadapt.h === 25")
    page.get_by_test_id("slice").fill(str(x))
    page.wait_for_function(f"window.samadapt.index === {x}")
    idle(page)
    flipped = page.evaluate("window.samadapt.flip")
    assert flipped == bool(volume.affine[2, 2] > 0)
    page.get_by_test_id("viewer").click(position=at(page, y, 24 - index if flipped else index))
    wait_status(page, "mask:")
    assert session.prompts[(1, 2, x)]["points"] == [[y, index, 1]]
    page.screenshot(path=str(DOCS / "app-axis2.png"))


def test_request_outside_root_refused(server, page):
    page.goto(server["url"])
    wait_status(page, "ready")
    code = page.evaluate(
        "async () => (await fetch('/api/open', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({path: '/etc/passwd'})})).status"
    )
    assert code == 403
    page.get_by_test_id("case-path").fill(str(server["root"]) + "/../../etc/passwd")
    page.get_by_test_id("open").click()
    assert "outside the folders this app may open" in wait_status(page, "error:")
    for testid in ("viewer", "mode-point", "mode-box", "undo", "propagate", "save", "adapt", "status"):
        assert page.get_by_test_id(testid).count() == 1, testid


EVIL_PAGE = """<!doctype html><body>
<form id="form" method="POST" action="{app}/api/open" enctype="text/plain">
<input name='{{"path": "{case}", "x": "' value='"}}'></form>
<script>
window.sent = fetch("{app}/api/open", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
  body: JSON.stringify({{path: "{case}"}})}}).then(() => "sent", (e) => "failed: " + e);
</script></body>"""


def test_another_page_and_a_rebound_name_are_refused(chromium, workspace, root):
    """Chromium as an attacked user's browser, against the app served without a token (so that Host and Origin
    alone must hold): a page of another origin posts to the app (fetch, then a form), and a page whose name
    resolves to 127.0.0.1 (``--host-resolver-rules``: DNS rebinding without a DNS server) reads the API."""
    import http.server

    case = root / "scans" / "disc.nii.gz"
    with running(create_app(workspace)) as port:
        app = f"http://127.0.0.1:{port}"
        page_bytes = EVIL_PAGE.format(app=app, case=case).encode()

        class Evil(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the handler's name)
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(page_bytes)

            def log_message(self, *args):
                pass

        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        args = [*ARGS, "--host-resolver-rules=MAP evil.example.com 127.0.0.1"]
        browser = chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            answers = []
            page.on("response", lambda response: answers.append((response.url, response.status)))
            page.goto(f"http://evil.example.com:{evil.server_address[1]}/")
            assert page.evaluate("window.sent") == "sent"  # it reached the app (an opaque answer) ...
            with page.expect_navigation():
                page.evaluate("document.getElementById('form').submit()")
            assert (f"{app}/api/open", 403) in answers  # ... which refused it, as it refused the form
            assert "a request from another page" in page.content()
            # rebinding: the attacker's name, now pointing at 127.0.0.1, on the app's port
            response = page.goto(f"http://evil.example.com:{port}/")
            assert response.status == 403 and "is not served here" in page.content()
            read = "async () => { const r = await fetch('/api/info'); return [r.status, await r.text()]; }"
            status_code, text = page.evaluate(read)
            assert status_code == 403 and "disc.nii.gz" not in text
            page.goto(f"{app}/")  # the app's own page, by its own name, still works
            assert page.evaluate(read)[0] == 200
        finally:
            browser.close()
            evil.shutdown()
    assert workspace.sessions == {}  # nothing was opened by another page


def test_corrective_click_is_carried_and_the_volume_completed(server, page):
    """A box, propagate, then the CVPR 2025 simulated user's corrective click (largest 3D error component) on its
    slice: the page shows the model's answer to that slice's prompts and re-propagates to the neighbours; then
    "complete volume" from the finished slices leaves them bit for bit and fills only unlabelled voxels elsewhere."""
    from samadapt.prompts import corrective_click_3d

    demo = server["demo"]
    image_path = demo["lesions"] / "imagesTr" / "brain2.nrrd"
    lesion = read_label(demo["lesions"] / "labelsTr" / "brain2.nrrd").array > 0
    index = int(np.argmax(lesion.sum((1, 2))))
    ys, xs = np.nonzero(lesion[index])
    open_at(page, server["url"], image_path, index)
    page.get_by_test_id("mode-box").click()
    drag(page, (int(xs.min()) - 4, int(ys.min()) - 4), (int(xs.max()) + 4, int(ys.max()) + 4))
    wait_status(page, "mask:")
    page.get_by_test_id("propagate").click()
    wait_status(page, "propagated")
    workspace = server["workspace"]
    session = workspace.session(page.evaluate("window.samadapt.sess.session"))
    assert sum((session.labels[i] == 1).any() for i in range(len(lesion))) > 1

    where, click = corrective_click_3d(lesion, session.labels == 1)
    page.get_by_test_id("mode-point").click()
    page.get_by_test_id("slice").fill(str(where))
    page.wait_for_function(f"window.samadapt.index === {where} && window.samadapt.raw !== null")
    idle(page)
    page.get_by_test_id("viewer").click(
        position=at(page, int(click.x), int(click.y)), button="left" if click.positive else "right"
    )
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.includes('carried to')")
    idle(page)
    prompts = session.prompts[(1, 0, where)]
    assert prompts["points"][-1] == [int(click.x), int(click.y), int(click.positive)]
    volume = read_volume(image_path)
    plane = volume_slice(preprocess_volume(volume.array, session.preset), where, 0, session.preset)
    predictor = Predictor.for_run(workspace.run, "cpu")
    predictor.set_image(plane, preprocessed=True)
    points = np.array([p[:2] for p in prompts["points"]], np.float32)
    answer = predictor.predict(
        points=points, labels=np.array([p[2] for p in prompts["points"]]), boxes=np.array(prompts["box"], np.float32)
    )
    np.testing.assert_array_equal(drawn(page, 1), answer.masks[0, 0])
    assert page.evaluate("window.samadapt.lastTiming.carried") >= 1
    page.screenshot(path=str(DOCS / "app-corrective-click.png"))

    finished = sorted(i for a, i in session.finished if a == 0)
    assert index in finished and where in finished
    before = session.labels.copy()
    page.get_by_test_id("complete-steps").fill("2")  # a LiteMedSAM step at batch 4 takes ~20 s on 2 AVX2 cores
    page.get_by_test_id("complete").click()
    page.wait_for_function(
        "document.querySelector('[data-testid=status]').textContent.startsWith('completed:')", timeout=600_000
    )
    text = wait_status(page, "completed:")
    assert (
        f"completed: {int((session.labels != before).sum())} voxels" in text
        and f"from {len(finished)} finished" in text
    )
    np.testing.assert_array_equal(session.labels[finished], before[finished])
    np.testing.assert_array_equal(session.labels[before != 0], before[before != 0])
    page.get_by_test_id("slice").fill(str(index + 1))
    page.wait_for_function(f"window.samadapt.index === {index + 1}")
    idle(page)
    page.screenshot(path=str(DOCS / "app-completed.png"))
