// The chat page: a client of the WebSocket protocol in docs/websocket.md, plus the sessions API for
// the session list.
//
// How reconnecting works: ChatSocket reopens a dropped socket with exponential backoff and then calls
// ChatApp.resync(). Replies go on on the server when a socket drops, and every event of a reply has an
// id, so:
// - a reply that was streaming keeps its bubble ("resuming…"); resync() sends
//   {type: "resume", reply_id, last_event_id} and the rest of the reply streams into the same bubble;
// - a drop before the reply's first event (its id not known yet): resync() sends `start`, and the
//   `session` answer names the reply being generated (`active_reply_id`), which is then resumed;
// - with no reply in flight, resync() sends `start` for the current session and the saved history
//   replaces what is on screen;
// - a reload in the middle of a reply: the reply's id is kept in localStorage, so after the history
//   comes back the page resumes that reply from its first event.
// Who is calling: auth.js (an API key, sent as a bearer header; a ticket on the socket's URL).
// If the reply is gone (retention over, 404/410), a notice says so and the saved history is shown;
// if the store is unavailable (503), resuming is tried again after 2 s. Stop works while resuming
// too: it cancels the reply by its URL (POST .../replies/{id}/cancel).

"use strict";

const WHO = Auth.id();
const CURRENT_KEY = `chatserve.session.${WHO}`;
const PENDING_KEY = `chatserve.pending.${WHO}`; // {replyId, sessionId, turnIndex, content}: a reply in flight

const $ = (sel) => document.querySelector(sel);

// A reply is untrusted text: its markdown may not load anything from elsewhere (images, media,
// frames: a tracking pixel is a remote load), post a form, or style the page. The page's CSP says the
// same to the browser.
const SANITIZE = {
  FORBID_TAGS: ["style", "link", "meta", "base", "form", "input", "button", "textarea", "select", "option",
                "iframe", "frame", "object", "embed", "img", "picture", "source", "video", "audio", "track",
                "svg", "math"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "background", "poster", "ping"],
  ALLOW_DATA_ATTR: false,
};

function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }), SANITIZE);
  for (const pre of el.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const lang = code && [...code.classList].find((c) => c.startsWith("language-"));
    if (lang) {
      const tag = document.createElement("span");
      tag.className = "lang";
      tag.textContent = lang.slice("language-".length);
      pre.prepend(tag);
    }
    const copy = document.createElement("button");
    copy.className = "copy";
    copy.type = "button";
    copy.textContent = "copy";
    copy.onclick = () => navigator.clipboard?.writeText(code ? code.textContent : pre.textContent);
    pre.appendChild(copy);
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...Auth.headers(), "content-type": "application/json", ...(options.headers || {}) },
  });
  if (response.status === 401 || response.status === 403) Auth.refused(response.status);
  if (!response.ok && response.status !== 404) throw new Error(`${path}: HTTP ${response.status}`);
  return response.status === 204 || response.status === 404 ? null : response.json();
}

/** One WebSocket to /v1/ws that comes back by itself: backoff 0.5 s, 1 s, 2 s ... 8 s. */
class ChatSocket {
  constructor(url, { onEvent, onOpen, onState }) {
    Object.assign(this, { url, onEvent, onOpen, onState, attempt: 0, ws: null, timer: null });
  }

  async connect() {
    let ticket = null;
    try { ticket = await Auth.ticket(); } catch { /* the server is away: retry below */ }
    if (ticket === null && document.getElementById("login")) return; // the key was refused: the page asks
    const ws = new WebSocket(ticket ? `${this.url}?ticket=${encodeURIComponent(ticket)}` : this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.onState("open");
      this.onOpen();
    };
    ws.onmessage = (frame) => {
      let event;
      try { event = JSON.parse(frame.data); } catch { return; }
      if (event.type === "ping") this.send({ type: "pong" });
      else this.onEvent(event);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onState("reconnecting");
      const delay = Math.min(8000, 500 * 2 ** this.attempt++) * (0.75 + Math.random() / 2);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  get open() { return this.ws !== null && this.ws.readyState === WebSocket.OPEN; }

  send(message) {
    if (!this.open) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /** Drop the connection as a network failure would (used to test reconnecting). */
  drop() { this.ws?.close(); }
}

class ChatApp {
  constructor() {
    this.sessionId = localStorage.getItem(CURRENT_KEY);
    this.pending = null; // {ref, el, text, content, replyId} of the reply being streamed
    this.queued = null; // a message waiting for its new session
    this.lastEventId = null;
    this.refs = 0;
    const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
    this.socket = new ChatSocket(wsUrl, {
      onEvent: (e) => this.onEvent(e),
      onOpen: () => this.resync(),
      onState: (state) => this.showConnection(state),
    });
  }

  start() {
    $("#composer").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("#prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); this.send(); }
    });
    $("#stop").addEventListener("click", () => this.stop());
    $("#new-chat").addEventListener("click", () => this.newChat());
    this.socket.connect();
    this.refreshSessions();
  }

  // -- connection ---------------------------------------------------------------------------------
  showConnection(state) {
    const el = $("#conn-state");
    el.dataset.state = state;
    el.textContent = state === "open" ? "connected" : "reconnecting…";
    if (state !== "open" && this.pending) {
      this.pending.el.dataset.state = "resuming";
      this.pending.el.querySelector(".status").textContent = "connection lost: resuming…";
    }
    if (state !== "open" && this.queued) { // the new session was not confirmed: keep the message
      $("#prompt").value = this.queued;
      this.queued = null;
    }
  }

  resync() {
    if (this.pending?.replyId) this.resume(this.pending.replyId, this.lastEventId);
    else if (this.sessionId) this.socket.send({ type: "start", session_id: this.sessionId, ref: "resync" });
  }

  /** Follow a reply from after ``lastEventId`` (or from its start): its events stream into `pending`. */
  resume(replyId, lastEventId) {
    this.socket.send({ type: "resume", reply_id: replyId, session_id: this.sessionId, last_event_id: lastEventId,
                       ref: "resume" });
  }

  /** Stop the reply being generated: by its URL once its id is known (works while reconnecting). */
  stop() {
    const pending = this.pending;
    if (pending?.replyId && this.sessionId) {
      api(`/v1/sessions/${this.sessionId}/replies/${pending.replyId}/cancel`, { method: "POST" })
        .catch((e) => this.notice(`Could not stop the reply: ${e.message}`));
    } else {
      this.socket.send({ type: "cancel" });
    }
  }

  /** After a reconnect, the answer to `start`: pick up a reply whose id we never saw, if it runs. */
  recover(session) {
    const pending = this.pending;
    if (session.active_reply_id) {
      pending.replyId = session.active_reply_id;
      this.resume(pending.replyId, null);
      return;
    }
    // Nothing running: the reply finished meanwhile (then it is in the history) or never started.
    const msgs = session.messages.filter((m) => m.role !== "system");
    const saved = msgs.length >= 2 && msgs[msgs.length - 2].content === pending.content;
    this.finishPending(saved ? "done" : "interrupted", saved ? "" : "connection lost before the reply started");
    this.renderHistory(session.messages);
  }

  /** After a reload: the reply that was streaming when the page went away, if it belongs here. */
  resumeSaved(session) {
    let saved = null;
    try { saved = JSON.parse(localStorage.getItem(PENDING_KEY)); } catch { /* nothing saved */ }
    if (!saved || saved.sessionId !== session.id || this.pending) return;
    if (session.turns > saved.turnIndex) { // it finished meanwhile and is in the history on screen
      localStorage.removeItem(PENDING_KEY);
      return;
    }
    this.clearEmpty();
    this.addMessage("user", saved.content);
    this.pending = { ref: "resume", content: saved.content, text: "", replyId: saved.replyId,
                     el: this.addMessage("assistant", "", "streaming") };
    this.setBusy(true);
    this.resume(saved.replyId, null);
  }

  nextRef() { return `r${++this.refs}`; }

  // -- sending ------------------------------------------------------------------------------------
  send() {
    const content = $("#prompt").value.trim();
    if (!content || this.pending || this.queued) return;
    if (!this.socket.open) { this.notice("Not connected yet; your message is kept. Try again in a moment."); return; }
    $("#prompt").value = "";
    this.notice(null);
    if (this.sessionId) {
      this.sendMessage(content);
    } else {
      this.queued = content;
      this.socket.send({ type: "start", title: content.slice(0, 60), ref: "new" });
    }
  }

  sendMessage(content) {
    const ref = this.nextRef();
    const message = { type: "message", content, ref };
    const maxTokens = parseInt($("#max-tokens").value, 10);
    const temperature = parseFloat($("#temperature").value);
    if (maxTokens > 0) message.max_tokens = maxTokens;
    if (temperature >= 0) message.temperature = temperature;
    this.clearEmpty();
    this.addMessage("user", content);
    this.pending = { ref, content, text: "", el: this.addMessage("assistant", "", "streaming") };
    this.setBusy(true);
    if (!this.socket.send(message)) this.finishPending("interrupted", "not sent: the connection dropped");
  }

  // -- events from the server ---------------------------------------------------------------------
  onEvent(event) {
    if (event.id !== undefined) this.lastEventId = event.id;
    switch (event.type) {
      case "session": return this.onSession(event);
      case "turn":
        if (!this.pending) return;
        this.pending.replyId = event.reply_id;
        localStorage.setItem(PENDING_KEY, JSON.stringify({ replyId: event.reply_id, sessionId: this.sessionId,
                                                           turnIndex: event.turn_index, content: this.pending.content }));
        if (event.history_turns_dropped > 0) {
          this.pending.note = `${event.history_turns_dropped} older turn(s) left out of the context`;
        }
        return;
      case "delta":
        if (!this.pending) return;
        if (this.pending.el.dataset.state === "resuming") {
          this.pending.el.dataset.state = "streaming";
          this.pending.el.querySelector(".status").textContent = "";
        }
        this.pending.text += event.text;
        return this.renderPending();
      case "done": return this.onDone(event);
      case "error": return this.onError(event);
      default: return;
    }
  }

  onSession(session) {
    if (session.ref === "resync" && this.pending && !this.pending.replyId) return this.recover(session);
    this.sessionId = session.id;
    localStorage.setItem(CURRENT_KEY, session.id);
    this.renderHistory(session.messages);
    this.refreshSessions();
    if (session.ref === "resync") this.resumeSaved(session);
    if (session.ref === "new" && this.queued) {
      const content = this.queued;
      this.queued = null;
      this.sendMessage(content);
    }
  }

  onDone(event) {
    if (!this.pending) return;
    if (event.finish_reason === "cancelled") {
      this.finishPending("stopped", "stopped: this reply was not saved");
    } else {
      const tokens = event.usage ? `${event.usage.completion_tokens} tokens` : "";
      this.finishPending("done", [event.finish_reason, tokens, this.pending.note].filter(Boolean).join(" · "));
    }
    this.refreshSessions();
  }

  onError(event) {
    if (event.ref === "resume" && event.id !== undefined) {
      // The resumed reply itself failed (an event of its log).
      if (this.pending) this.finishPending("error", `error ${event.status}: ${event.message}`);
    } else if (event.ref === "resume" && event.status === 503) {
      setTimeout(() => this.resync(), 2000); // the store is back soon, or the next try says more
    } else if (event.ref === "resume") {
      // The reply can no longer be followed (gone after its retention, or unknown): show what is saved.
      localStorage.removeItem(PENDING_KEY);
      if (this.pending) this.finishPending("error", "could not resume");
      this.notice(`This reply could not be resumed (${event.message}); the saved conversation is shown.`);
      this.socket.send({ type: "start", session_id: this.sessionId, ref: "reload" });
    } else if (event.ref === "resync" || event.ref === "open") {
      // The session is gone (expired, deleted, or the server lost its memory): start afresh.
      this.newChat();
      this.notice(`That session is no longer available (${event.message}).`);
    } else if (event.ref === "new") {
      $("#prompt").value = this.queued || "";
      this.queued = null;
      this.notice(`Could not start a session: ${event.message}`);
    } else if (this.pending && event.ref === this.pending.ref) {
      this.finishPending("error", `error ${event.status}: ${event.message}`);
    } else if (event.code !== "nothing_to_cancel") {
      this.notice(`Error: ${event.message}`);
    }
  }

  // -- the message list ---------------------------------------------------------------------------
  addMessage(role, text, state = "done") {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    el.dataset.state = state;
    el.innerHTML = `<div class="body"></div><div class="status"></div>`;
    if (role === "assistant") renderMarkdown(el.querySelector(".body"), text);
    else el.querySelector(".body").textContent = text;
    $("#messages").appendChild(el);
    el.scrollIntoView({ block: "end" });
    return el;
  }

  renderPending() {
    if (this.renderScheduled) return;
    this.renderScheduled = true;
    requestAnimationFrame(() => {
      this.renderScheduled = false;
      if (!this.pending) return;
      renderMarkdown(this.pending.el.querySelector(".body"), this.pending.text);
      this.pending.el.scrollIntoView({ block: "end" });
    });
  }

  finishPending(state, status) {
    const pending = this.pending;
    this.pending = null;
    localStorage.removeItem(PENDING_KEY);
    this.setBusy(false);
    renderMarkdown(pending.el.querySelector(".body"), pending.text);
    pending.el.dataset.state = state;
    pending.el.querySelector(".status").textContent = status;
    if (state === "interrupted") {
      if (!$("#prompt").value) $("#prompt").value = pending.content;
      this.notice("The connection dropped before the reply started; your message is back in the box.");
    }
  }

  renderHistory(messages) {
    if (this.pending) return; // a live reply is on screen; the history will be fetched after it
    const box = $("#messages");
    box.innerHTML = "";
    const visible = messages.filter((m) => m.role !== "system");
    if (!visible.length) box.innerHTML = `<p class="empty">Start a conversation: type below.</p>`;
    for (const m of visible) this.addMessage(m.role, m.content);
  }

  clearEmpty() { $("#messages .empty")?.remove(); }

  newChat() {
    if (this.pending) {
      this.stop();
      this.finishPending("stopped", "stopped");
    }
    this.sessionId = null;
    localStorage.removeItem(CURRENT_KEY);
    this.renderHistory([]);
    this.refreshSessions();
    $("#prompt").focus();
  }

  setBusy(busy) {
    $("#send").disabled = busy;
    $("#stop").hidden = !busy;
  }

  notice(text) {
    const el = $("#notice");
    el.hidden = !text;
    el.textContent = text || "";
  }

  // -- the session list ---------------------------------------------------------------------------
  async refreshSessions() {
    let sessions;
    try { sessions = (await api("/v1/sessions")).data; } catch { return; }
    const list = $("#sessions");
    list.innerHTML = "";
    for (const s of sessions) {
      const li = document.createElement("li");
      li.dataset.id = s.id;
      li.classList.toggle("active", s.id === this.sessionId);
      li.innerHTML = `<span class="title"></span><button class="delete" type="button" title="Delete">✕</button>`;
      li.querySelector(".title").textContent = `${s.title || "Untitled"} (${s.turns})`;
      li.querySelector(".title").onclick = () => this.open(s.id);
      li.querySelector(".delete").onclick = () => this.remove(s.id);
      list.appendChild(li);
    }
  }

  open(sessionId) {
    if (this.pending || sessionId === this.sessionId) return;
    this.sessionId = sessionId;
    this.socket.send({ type: "start", session_id: sessionId, ref: "open" });
  }

  async remove(sessionId) {
    await api(`/v1/sessions/${sessionId}`, { method: "DELETE" });
    if (sessionId === this.sessionId) this.newChat();
    else this.refreshSessions();
  }
}

window.chatApp = new ChatApp();
window.chatApp.start();
