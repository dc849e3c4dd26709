"""The gateway's pages in headless Chromium, against a devnet on loopback (see conftest.py).

Everything waits on a condition of the page (Playwright's `expect` polls it) or of the
network (in the devnet's trio thread), never on a sleep.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import trio
import trio.testing
from PIL import Image

from sdcn_p2p.devnet import Devnet, open_devnet
from sdcn_p2p.provider import Provider
from sdcn_p2p.testing.browser import TrioThread

pytest.importorskip("playwright", reason="the page tests need Playwright (the test extra)")
from playwright.sync_api import Browser, BrowserContext, Page, expect

NewContext = Callable[..., AbstractContextManager[BrowserContext]]

# Records what the progress bar and the status line showed, change by change.
WATCH_JOB = """() => {
  window.seen = { steps: [], statuses: [] };
  const bar = document.getElementById("progress");
  const line = document.getElementById("status");
  new MutationObserver((records) => {
    for (const record of records) window.seen.steps.push(Number(record.oldValue));
  }).observe(bar, {
    attributes: true, attributeFilter: ["aria-valuenow"], attributeOldValue: true
  });
  new MutationObserver(() => window.seen.statuses.push(line.textContent))
    .observe(line, { childList: true, characterData: true, subtree: true });
}"""
DROP = """async ([zone, name, type, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const files = new DataTransfer();
  files.items.add(new File([bytes], name, { type }));
  const target = document.getElementById(zone);
  for (const kind of ["dragenter", "dragover", "drop"]) {
    const init = { bubbles: true, cancelable: true, dataTransfer: files };
    target.dispatchEvent(new DragEvent(kind, init));
  }
}"""


# A model the page listed before it left the network (the page reads the catalog every 30 s).
LEFT_MODEL = """(name) => {
  const select = document.getElementById("model");
  select.append(new Option(name, name));
  select.value = name;
}"""


def provider_of(devnet: Devnet, model: str) -> Provider:
    [provider] = [p for p in devnet.providers if model in [m.name for m in p.capabilities.models]]
    return provider


def generation_page(context: BrowserContext) -> Page:
    page = context.new_page()
    page.goto("/")
    expect(page.locator("html")).to_have_attribute("data-ready", "true")
    return page


def fill(page: Page, **fields: str) -> None:
    for label, value in fields.items():
        page.get_by_label(label.replace("_", " ").capitalize(), exact=True).fill(value)


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 220)).save(out, "PNG")
    return out.getvalue()


def steps_shown(page: Page) -> list[int]:
    """Every value the progress bar had, the current one last."""
    now = int(page.get_by_role("progressbar").get_attribute("aria-valuenow"))
    return [*page.evaluate("window.seen.steps"), now]


# --- the generation page -----------------------------------------------------------------------


def test_generate_an_image_following_its_progress(
    context: BrowserContext, devnet: TrioThread[Devnet]
) -> None:
    page = generation_page(context)
    page.evaluate(WATCH_JOB)
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_role("combobox", name="Model").select_option("sdxl-base")
    fill(page, width="384", height="256", steps="12")
    page.get_by_role("checkbox", name="Random").uncheck()
    fill(page, seed="7")
    page.get_by_role("button", name="Generate").click()

    image = page.get_by_role("img", name="Generated image")
    expect(image).to_have_js_property("naturalWidth", 384)  # loaded and decoded
    expect(image).to_have_js_property("naturalHeight", 256)
    bar = page.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuemax", "12")
    expect(bar).to_have_attribute("aria-valuenow", "12")
    steps = steps_shown(page)
    assert steps == sorted(steps) and steps[-1] == 12 and len(set(steps)) >= 4, steps
    statuses = page.evaluate("window.seen.statuses")
    assert any(s.startswith("Waiting for a provider") for s in statuses), statuses
    assert any(s.startswith("Running on …") for s in statuses), statuses

    provider = str(provider_of(devnet.value, "sdxl-base").peer.peer_id)
    caption = page.locator("figcaption").first
    for text in ("seed 7", "sdxl-base", f"on …{provider[-8:]}"):
        expect(caption).to_contain_text(text)
    expect(caption).to_contain_text(re.compile(r"sdxl-base on …\w{8} [\d.]+ s "))
    download = page.get_by_role("link", name="Download image with seed 7")
    expect(download).to_have_attribute("download", "sdcn-7.png")
    response = page.request.get(download.get_attribute("href"))
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.body())).size == (384, 256)
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()

    # The last settings come back on the next visit.
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a lighthouse at dusk")
    expect(page.get_by_role("combobox", name="Model")).to_have_value("sdxl-base")
    expect(page.get_by_label("Width")).to_have_value("384")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("7")
    expect(page.get_by_role("checkbox", name="Random")).not_to_be_checked()


def test_cancel_a_slow_job_frees_the_provider(
    context: BrowserContext, devnet: TrioThread[Devnet]
) -> None:
    provider = provider_of(devnet.value, "dreamshaper-8")  # 3 it/s: this job takes 50 s
    cancelled = provider.jobs_cancelled
    page = generation_page(context)
    page.get_by_label("Prompt", exact=True).fill("a slow one")
    page.get_by_role("combobox", name="Model").select_option("dreamshaper-8")
    fill(page, width="512", height="512", steps="150")
    page.get_by_role("button", name="Generate").click()
    bar = page.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuemax", "150")
    expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]"))  # running there

    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("status")).to_have_text("Cancelled.")
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()

    async def freed() -> int:
        with trio.fail_after(10):  # far sooner than the job would take
            await provider.wait_idle()
        await trio.testing.wait_all_tasks_blocked()
        return provider.jobs_cancelled

    assert devnet.run(freed) == cancelled + 1
    assert provider.load == 0


def test_a_bad_field_is_shown_next_to_it_and_other_errors_in_one_line(
    context: BrowserContext,
) -> None:
    page = generation_page(context)
    page.get_by_role("combobox", name="Model").select_option("sd-v1-5")
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a lighthouse")
    fill(page, width="100", height="96", steps="4")
    prompt.press("Control+Enter")  # submits from the keyboard
    width = page.get_by_label("Width")
    expect(width).to_have_attribute("aria-invalid", "true")
    expect(width).to_have_accessible_description(re.compile(r"^width: must be a multiple of 8"))
    expect(width).to_be_focused()
    expect(page.locator(".field:has(#width) .error")).to_have_text(re.compile("^width: "))
    expect(page.locator("#error")).to_be_empty()
    expect(page.get_by_role("status")).to_have_text("Not submitted.")

    # A model that left the network since the page listed it: a 404, shown in the error line.
    fill(page, width="128")
    page.evaluate(LEFT_MODEL, "retired-model")
    page.get_by_role("button", name="Generate").click()
    alert = page.locator("#error")
    expect(alert).to_have_text("no provider offers model 'retired-model' (HTTP 404)")
    expect(alert).to_be_visible()
    expect(width).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator(".error:not(:empty)")).to_have_count(0)


def test_img2img_from_the_file_picker_or_a_drop(context: BrowserContext) -> None:
    page = generation_page(context)
    page.get_by_role("combobox", name="Model").select_option("sd-v1-5")
    page.get_by_label("Prompt", exact=True).fill("the same, in blue")
    fill(page, width="128", height="96", steps="3")
    page.get_by_role("radio", name="Image to image").check()
    picker = page.get_by_label("Init image")
    picker.set_input_files(files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
    expect(page.locator("#init_image-about")).to_have_text(re.compile(r"^notes\.txt: 1 KB"))
    page.get_by_role("button", name="Generate").click()
    expect(picker).to_have_accessible_description(re.compile(r"init_image: "))
    expect(picker).to_have_attribute("aria-invalid", "true")

    # Dropped anywhere on the page (here on the prompt), an image becomes the init image.
    page.get_by_role("radio", name="Text to image").check()
    png = base64.b64encode(png_bytes(96, 64)).decode()
    page.evaluate(DROP, ["prompt", "init.png", "image/png", png])
    expect(page.get_by_role("radio", name="Image to image")).to_be_checked()
    expect(page.locator("#init_image-about")).to_have_text(re.compile(r"^init\.png: 96\u00d764, "))
    page.get_by_label("Denoising strength").fill("0.4")
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name="Generated image")
    expect(image).to_have_js_property("naturalWidth", 128)
    expect(image).to_have_js_property("naturalHeight", 96)
    expect(picker).not_to_have_attribute("aria-invalid", "true")


def test_every_control_is_labelled_and_reachable_by_keyboard(context: BrowserContext) -> None:
    page = generation_page(context)
    page.get_by_role("combobox", name="Model").select_option("sd-v1-5")  # it has LoRAs
    page.get_by_role("radio", name="Image to image").check()
    for role, name in [
        ("textbox", "Prompt"),
        ("textbox", "Negative prompt"),
        ("combobox", "Model"),
        ("combobox", "Sampler"),
        ("checkbox", "pixel-art"),
        ("spinbutton", "weight of pixel-art"),
        ("spinbutton", "Width"),
        ("spinbutton", "Height"),
        ("spinbutton", "Steps"),
        ("spinbutton", "CFG scale"),
        ("spinbutton", "Seed"),
        ("checkbox", "Random"),
        ("spinbutton", "Batch size"),
        ("radio", "Text to image"),
        ("spinbutton", "Denoising strength"),
        ("button", "Generate"),
    ]:
        expect(page.get_by_role(role, name=name, exact=True)).to_be_visible()
    unnamed = """() => [...document.querySelectorAll("input, select, textarea")]
        .filter((e) => !e.labels.length && !e.getAttribute("aria-label")).map((e) => e.id)"""
    assert page.evaluate(unnamed) == []
    expect(page.get_by_label("Init image")).to_be_visible()
    samplers = page.get_by_role("combobox", name="Sampler").locator("option").all_text_contents()
    assert "Euler a" in samplers and "DDIM" in samplers
    expect(page.get_by_role("combobox", name="Sampler")).to_have_value("Euler a")

    page.get_by_label("Prompt", exact=True).focus()
    for _ in range(40):
        if page.evaluate("document.activeElement.id") == "generate":
            break
        page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Generate")).to_be_focused()


# --- the network page --------------------------------------------------------------------------


def network_page(context: BrowserContext) -> Page:
    page = context.new_page()
    page.goto("/network?refresh=0.5")
    expect(page.locator("html")).to_have_attribute("data-updates", re.compile(r"^\d"))
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    return page


def provider_rows(page: Page):  # type: ignore[no-untyped-def]
    return page.get_by_role("table", name="Providers").locator("tbody tr[data-peer]")


def test_network_page_shows_each_provider_and_refreshes_itself(
    context: BrowserContext, devnet: TrioThread[Devnet]
) -> None:
    net = devnet.value
    page = network_page(context)
    rows = provider_rows(page)
    expect(rows).to_have_count(3)
    assert {rows.nth(i).get_attribute("data-peer") for i in range(3)} == {
        str(p.peer.peer_id) for p in net.providers
    }
    expect(page.locator("#providers_online")).to_have_text("3")
    expect(page.locator("#models_online")).to_have_text("3")
    # How loaded the gateway is: jobs per provider slot, from /v1/status.
    expect(page.locator("#load")).to_have_text(re.compile(r"^\d+\.\d\d$"))
    expect(page.locator("#clients_active")).to_have_text(re.compile(r"^\d+$"))
    models = page.get_by_role("table", name="Models")
    expect(models.locator("tr[data-model='sd-v1-5'] td").first).to_have_text("3")
    expect(models.locator("tr[data-model='sdxl-base'] td").first).to_have_text("1")

    # A job through the gateway shows in the table at the next refresh, without a reload.
    sdxl = str(provider_of(net, "sdxl-base").peer.peer_id)
    row = page.locator(f"tr[data-peer='{sdxl}']")
    before = int(row.locator("td").nth(6).text_content())
    response = page.request.post(
        "/txt2img",
        data={"prompt": "x", "model": "sdxl-base", "steps": 2, "width": 64, "height": 64},
    )
    assert response.status == 200
    expect(row.locator("td").nth(6)).to_have_text(str(before + 1))
    expect(row.locator("td").nth(7)).to_have_text("proven")
    assert page.evaluate("window.loadedOnce") is True


@pytest.fixture
def small_devnet(browser: Browser) -> Iterator[TrioThread[Devnet]]:
    with TrioThread(lambda: open_devnet(providers=2, http="127.0.0.1:0")) as thread:
        yield thread


def test_network_page_updates_when_a_provider_leaves(
    new_context: NewContext, small_devnet: TrioThread[Devnet]
) -> None:
    net = small_devnet.value
    with new_context(net.url) as context:
        page = network_page(context)
        rows = provider_rows(page)
        expect(rows).to_have_count(2)
        expect(page.locator("#providers_online")).to_have_text("2")
        leaving = net.providers[0]

        small_devnet.run(leaving.drain)  # what Ctrl-C on `sdcn node` does first

        row = page.locator(f"tr[data-peer='{leaving.peer.peer_id}']")
        expect(row).to_have_attribute("data-state", "draining")
        expect(row.locator("td").nth(1)).to_have_text("draining")
        expect(page.locator("#providers_online")).to_have_text("1")
        expect(rows.first).to_have_attribute("data-state", "online")  # online ones first
        assert page.evaluate("window.loadedOnce") is True


# --- every page ------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "loaded"), [("/", "data-ready"), ("/network", "data-updates")])
def test_pages_fit_a_phone_and_follow_the_colour_scheme(
    new_context: NewContext, devnet: TrioThread[Devnet], path: str, loaded: str
) -> None:
    colours = {}
    for scheme in ("light", "dark"):
        phone = {"viewport": {"width": 375, "height": 740}, "is_mobile": True, "has_touch": True}
        with new_context(devnet.value.url, color_scheme=scheme, **phone) as context:
            page = context.new_page()
            page.goto(path)
            expect(page.locator("html")).to_have_attribute(loaded, re.compile(r"\w"))
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            colours[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert colours["light"] != colours["dark"]
