// The pages' credential: an API key (or an identity provider's token). It comes from the link that
// `make run` prints (/#key=..., a URL fragment: never sent to the server or kept in its logs), or is
// pasted once; it is kept in this browser's localStorage and sent as `Authorization: Bearer`. A
// WebSocket cannot carry that header, so the socket URL carries a short-lived ticket instead
// (POST /v1/ws-ticket). When the server refuses the key (401/403), the page asks for another.

"use strict";

const Auth = (() => {
  const STORE = "chatserve.key";
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromLink) {
    localStorage.setItem(STORE, fromLink);
    history.replaceState(null, "", location.pathname + location.search); // the key leaves the address bar
  }

  function key() { return localStorage.getItem(STORE); }

  function ask(message) {
    if (document.getElementById("login")) return;
    const box = document.createElement("dialog");
    box.id = "login";
    const form = document.createElement("form");
    form.method = "dialog";
    const text = document.createElement("p");
    text.textContent = message;
    const input = document.createElement("input");
    input.type = "password";
    input.placeholder = "cs-… (python -m serve_app.admin keys create --user you)";
    input.autocomplete = "off";
    const button = document.createElement("button");
    button.textContent = "Use this key";
    form.append(text, input, button);
    box.append(form);
    form.addEventListener("submit", () => {
      if (input.value.trim()) localStorage.setItem(STORE, input.value.trim());
      location.reload();
    });
    document.body.append(box);
    box.showModal();
  }

  return {
    key,
    /** A short id of the credential, to keep each identity's page state apart. */
    id() { const k = key() || "anonymous"; return k.startsWith("cs-") ? k.slice(3, 15) : k.slice(-16); },
    headers() { return key() ? { Authorization: `Bearer ${key()}` } : {}; },
    refused(status) {
      if (status === 401) localStorage.removeItem(STORE);
      ask(status === 403 ? "This page needs an admin key." : "Your key was refused: paste a valid API key.");
    },
    ask,
    async ticket() {
      const response = await fetch("/v1/ws-ticket", { method: "POST", headers: this.headers() });
      if (response.status === 401 || response.status === 403) { this.refused(response.status); return null; }
      if (!response.ok) throw new Error(`ws-ticket: HTTP ${response.status}`);
      return (await response.json()).ticket;
    },
  };
})();
