"""The chat page and the ops page in a real browser: headless Debian Chromium driven by Playwright.

Screenshots go to test-artifacts/ (gitignored). Without /usr/bin/chromium (make test installs it with
apt-get as root) these tests skip and say so.
"""

import uuid
from pathlib import Path

import httpx
import pytest

from ....apps import token_for
from ...helpers import as_admin, as_user

pytestmark = [pytest.mark.serve, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[4] / "test-artifacts"  # the project root's, gitignored
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium; `make test` installs it with apt-get as root")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright missing: run `make setup`")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_chat(page, base_url, user):
    page.goto(f"{base_url}/#key={token_for(user)}")  # the link `make run` prints, with this user's credential
    page.wait_for_selector("#conn-state[data-state=open]")


def send(page, text, max_tokens):
    if page.locator("#composer details").get_attribute("open") is None:
        page.click("#composer summary")  # the settings fold
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")


def last_reply(page):
    return page.locator(".msg.assistant").last


def test_chat_streams_a_reply_and_shows_the_history_after_reload(page, base_url):
    user = f"browser-{uuid.uuid4().hex[:8]}"
    open_chat(page, base_url, user)
    send(page, "Show a Python hello world in a code block.", max_tokens=40)
    # Streaming: text is on screen while the reply is still marked as streaming.
    page.wait_for_function("""() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && m.dataset.state === 'streaming' && m.querySelector('.body').textContent.length > 0; }""")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    reply = last_reply(page).locator(".body").inner_text()
    assert reply.strip()
    assert "tokens" in last_reply(page).locator(".status").inner_text()
    assert page.locator("#sessions li").count() == 1  # the new session is listed, titled by the message
    assert "Python hello world" in page.locator("#sessions li").first.inner_text()

    page.reload()
    page.wait_for_selector("#conn-state[data-state=open]")
    page.wait_for_selector(".msg.assistant")
    messages = page.locator(".msg")
    assert messages.count() == 2
    assert messages.nth(0).inner_text().strip() == "Show a Python hello world in a code block."
    assert messages.nth(1).locator(".body").inner_text() == reply  # the saved reply, rendered the same way


def test_stop_button_stops_the_reply_and_nothing_is_saved(page, base_url):
    user = f"browser-{uuid.uuid4().hex[:8]}"
    open_chat(page, base_url, user)
    send(page, "Write a very long poem about the sea.", max_tokens=400)
    page.wait_for_function("""() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && m.querySelector('.body').textContent.length > 0; }""")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    assert "not saved" in last_reply(page).locator(".status").inner_text()
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_hidden()
    sessions = httpx.get(f"{base_url}/v1/sessions", headers=as_user(user)).json()["data"]
    assert [s["turns"] for s in sessions] == [0]


def test_reconnects_after_the_socket_drops_and_goes_on(page, base_url):
    user = f"browser-{uuid.uuid4().hex[:8]}"
    open_chat(page, base_url, user)
    send(page, "Say one word.", max_tokens=8)
    page.wait_for_selector(".msg.assistant[data-state=done]")
    page.evaluate("window.chatApp.socket.drop()")
    page.wait_for_selector("#conn-state[data-state=reconnecting]")
    page.wait_for_selector("#conn-state[data-state=open]")  # back, and `start` re-bound the same session
    send(page, "Say another word.", max_tokens=8)
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
    sessions = httpx.get(f"{base_url}/v1/sessions", headers=as_user(user)).json()["data"]
    assert [s["turns"] for s in sessions] == [2]  # both turns in the one session


def wait_streaming(page):
    page.wait_for_function("""() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && m.dataset.state === 'streaming' && m.querySelector('.body').textContent.length > 0; }""")


def saved_reply_as_rendered(page) -> str:
    """Reload: the last reply as the page renders it from the saved history."""
    page.reload()
    page.wait_for_selector("#conn-state[data-state=open]")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    return last_reply(page).locator(".body").inner_text()


def test_a_dropped_socket_mid_reply_resumes_into_the_same_bubble(page, base_url):
    user = f"browser-{uuid.uuid4().hex[:8]}"
    open_chat(page, base_url, user)
    send(page, "Write a long story about a lighthouse.", max_tokens=120)
    wait_streaming(page)
    page.evaluate("window.chatApp.socket.drop()")
    page.wait_for_selector(".msg.assistant[data-state=resuming]")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert page.locator(".msg.assistant").count() == 1
    streamed = last_reply(page).locator(".body").inner_text()
    assert "tokens" in last_reply(page).locator(".status").inner_text()
    # Nothing lost or repeated across the drop: the bubble is the saved reply.
    assert saved_reply_as_rendered(page) == streamed


def test_a_reload_mid_reply_picks_the_reply_up_again(page, base_url):
    user = f"browser-{uuid.uuid4().hex[:8]}"
    open_chat(page, base_url, user)
    send(page, "Write a long story about a dragon.", max_tokens=120)
    wait_streaming(page)
    assert page.evaluate("Object.keys(localStorage).some(k => k.startsWith('chatserve.pending.'))")  # kept
    page.reload()
    page.wait_for_selector("#conn-state[data-state=open]")
    page.wait_for_selector(".msg.assistant[data-state=streaming]")  # picked up while still running
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert page.locator("#messages .empty").count() == 0
    assert [page.locator(".msg").nth(i).get_attribute("class") for i in range(page.locator(".msg").count())] == [
        "msg user", "msg assistant"]
    assert page.locator(".msg.user").inner_text().strip() == "Write a long story about a dragon."
    streamed = last_reply(page).locator(".body").inner_text()
    assert saved_reply_as_rendered(page) == streamed


def test_ops_page_shows_live_figures(page, base_url):
    r = httpx.post(base_url + "/v1/chat/completions", timeout=120, headers=as_user(),
                   json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hello"}],
                         "max_tokens": 8})
    assert r.status_code == 200
    page.goto(f"{base_url}/ops#key={as_admin()['Authorization'][7:]}")
    page.wait_for_function("""() => ['#fig-tokens', '#fig-ttft-p50', '#fig-ttft-p95']
        .every(s => document.querySelector(s).textContent !== '–')""")
    assert int(page.inner_text("#fig-replicas")) >= 1
    assert float(page.inner_text("#fig-tokens")) > 0
    assert page.inner_text("#fig-ttft-p50").endswith(("ms", "s"))
    deployments = page.locator("#deployments tbody tr").all_inner_texts()
    assert {"Ingress", "DialogueState", "ModelServer", "OpsCollector"} <= {row.split("\t")[0] for row in deployments}
    assert page.locator("#replicas tbody tr").count() >= 1
    assert page.locator("#events li[data-kind=replica_up]").count() >= 1
    assert page.locator("#chart-tokens polyline, #chart-tokens circle").count() >= 1


def test_without_a_key_the_page_asks_for_one_and_a_pasted_key_signs_in(page, base_url):
    page.goto(f"{base_url}/")
    page.wait_for_selector("#login[open]")  # the API refused the missing credential
    page.fill("#login input", token_for("paster"))
    page.click("#login button")
    page.wait_for_selector("#conn-state[data-state=open]")
    send(page, "Say one word.", max_tokens=4)
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert [s["turns"] for s in httpx.get(f"{base_url}/v1/sessions", headers=as_user("paster")).json()["data"]] == [1]


def test_reply_markdown_cannot_load_remote_content_post_forms_or_style_the_page(page, base_url):
    open_chat(page, base_url, f"browser-{uuid.uuid4().hex[:8]}")
    html = page.evaluate("""() => { const el = document.createElement('div');
        renderMarkdown(el, '![pixel](http://203.0.113.9/t.png) <img src=http://203.0.113.9/x.png>' +
          '<form action=http://203.0.113.9/steal><input name=q><button>go</button></form>' +
          '<b style="position:fixed">bold</b> <style>body{display:none}</style> <iframe src=/ops></iframe>' +
          '<a href="javascript:alert(1)">x</a> [ok](https://example.org)');
        return el.innerHTML; }""")
    for banned in ("<img", "<form", "<input", "<button", "<style", "style=", "<iframe", "javascript:"):
        assert banned not in html, (banned, html)
    assert "<b>bold</b>" in html and 'href="https://example.org"' in html  # the text and safe links stay
