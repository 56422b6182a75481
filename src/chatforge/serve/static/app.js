// The chatforge chat page: streams replies from POST /v1/chat/completions, lists their sources,
// and sends thumbs, reasons and corrected answers to POST /v1/feedback (see docs/SERVING.md).
//
// Everything the model or the documents wrote reaches the page as text (textContent, text
// nodes), never as HTML.
"use strict";

(function () {
  const KEY_STORAGE = "chatforge.apiKey";
  const REASONS = [
    ["", "No particular reason"],
    ["inaccurate", "Inaccurate"],
    ["not_in_documents", "Not in the documents"],
    ["too_long", "Too long"],
    ["unhelpful", "Unhelpful"],
  ];

  const $ = (id) => document.getElementById(id);
  const log = $("conversation");
  const form = $("composer");
  const question = $("question");
  const sendButton = $("send");
  const stopButton = $("stop");
  const errorBox = $("error");
  const keyPanel = $("key-panel");
  const keyInput = $("api-key");

  const state = {
    messages: [],          // the conversation so far, as sent to the server
    conversationId: null,  // returned by the server's first response
    model: null,           // from GET /health
    controller: null,      // AbortController of the reply being streamed
    epoch: 0,              // bumped by "New conversation": a reply still in flight is dropped
  };

  // ------------------------------------------------------------------ small helpers

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else if (name in node && typeof value !== "string") node[name] = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);   // strings become text nodes
    return node;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = keyInput.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function showKeyPanel() {
    keyPanel.hidden = false;
  }

  // The text of an error response: OpenAI's {"error": {"message"}} when the server sent it.
  async function errorMessage(response) {
    let detail = "";
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") detail = body.error.message;
      else if (body && typeof body.detail === "string") detail = body.detail;
    } catch (_) {
      // not JSON: fall back to the status line
    }
    if (response.status === 401) {
      showKeyPanel();
      const why = keyInput.value.trim()
        ? "The API key was not accepted. Check it in the API key field and try again."
        : "This server needs an API key. Enter it in the API key field above and try again.";
      return detail ? why + " (" + detail + ")" : why;
    }
    if (detail) return detail;
    return "The server answered " + response.status + (response.statusText ? " " + response.statusText : "") + ".";
  }

  function networkMessage(err) {
    return "Could not reach the server (" + (err && err.message ? err.message : "network error") +
      "). Check that chatforge serve is running, then try again.";
  }

  function nearBottom() {
    const root = document.scrollingElement || document.documentElement;
    return root.scrollHeight - root.scrollTop - root.clientHeight < 120;
  }

  function scrollToEnd() {
    const root = document.scrollingElement || document.documentElement;
    root.scrollTop = root.scrollHeight;
  }

  function setStreaming(on) {
    sendButton.disabled = on;
    stopButton.hidden = !on;
    stopButton.disabled = !on;
    document.body.classList.toggle("streaming", on);
  }

  // ------------------------------------------------------------------ server-sent events

  // Calls onData(payload) for each event's data; resolves true when "[DONE]" arrived.
  async function readEvents(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const dispatch = () => {
      if (!data.length) return false;
      const payload = data.join("\n");
      data = [];
      if (payload === "[DONE]") return true;
      onData(payload);
      return false;
    };
    const handleLine = (line) => {
      if (line === "") return dispatch();
      if (line.startsWith(":")) return false;              // a comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      return false;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        let cut;
        while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, cut);
          buffer = buffer.slice(cut + (buffer.startsWith("\r\n", cut) ? 2 : 1));
          if (handleLine(line)) return true;
        }
        if (done) {
          if (buffer) handleLine(buffer);
          return dispatch();
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // ------------------------------------------------------------------ the conversation view

  function emptyHint() {
    return el("p", { id: "empty-hint", className: "empty-hint",
      text: "Ask a question about the documents this assistant was given." });
  }

  function addUserTurn(text) {
    const hint = $("empty-hint");
    if (hint) hint.remove();
    const turn = el("article", { className: "turn user", "aria-label": "You" },
      el("h2", { className: "who", text: "You" }),
      el("p", { className: "text", text: text }));
    log.append(turn);
    return turn;
  }

  function addAssistantTurn() {
    const text = el("p", { className: "text" });
    const note = el("p", { className: "note", hidden: true });
    const turn = el("article", { className: "turn assistant", "aria-label": "Assistant", "data-state": "streaming" },
      el("h2", { className: "who", text: "Assistant" }), text, note);
    log.append(turn);
    return { turn, text, note };
  }

  function renderSources(turn, sources) {
    if (!Array.isArray(sources) || !sources.length) return;
    const list = el("ol", { className: "source-list" });
    for (const s of sources) {
      const label = s && typeof s.source === "string" && s.source ? s.source : "(unnamed source)";
      const passage = s && typeof s.text === "string" ? s.text : "";
      // Which plugin gave it (docs, orders, ...), shown as text before the source's name.
      const plugin = s && typeof s.plugin === "string" && s.plugin ? s.plugin : "";
      const summary = el("summary", {},
        ...(plugin ? [el("span", { className: "source-plugin", text: plugin + ": " })] : []),
        el("span", { className: "source-label", text: label }));
      list.append(el("li", {},
        el("details", {}, summary, el("p", { className: "source-text", text: passage }))));
    }
    const section = el("section", { className: "sources", "aria-label": "Sources" },
      el("h3", { text: "Sources" }), list);
    const note = turn.querySelector(".note");
    turn.insertBefore(section, note);
  }

  // ------------------------------------------------------------------ feedback

  let feedbackCount = 0;

  // A thumb drawn inline (no icon font or emoji font needed); the "down" one is flipped in CSS.
  function thumbIcon() {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "18");
    svg.setAttribute("height", "18");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", "M2 10h4v11H2zM8 10l4-8c1.4 0 2.4 1 2.4 2.4V9h5.3c1.3 0 2.2 1.2 1.9 2.4" +
      "l-1.6 7.7c-.2 1-1.1 1.9-2.2 1.9H8z");
    path.setAttribute("fill", "currentColor");
    svg.append(path);
    return svg;
  }

  function addFeedback(turn, messageId) {
    const n = ++feedbackCount;
    const box = el("div", { className: "feedback" });
    const up = el("button", { type: "button", className: "thumb up", "aria-label": "Good answer",
      title: "Good answer", "aria-pressed": "false" }, thumbIcon());
    const down = el("button", { type: "button", className: "thumb down", "aria-label": "Bad answer",
      title: "Bad answer", "aria-pressed": "false" }, thumbIcon());
    const thumbs = el("div", { className: "thumbs", role: "group", "aria-label": "Rate this answer" }, up, down);

    const reason = el("select", { id: "reason-" + n, name: "reason" });
    for (const [value, label] of REASONS) reason.append(el("option", { value, text: label }));
    const comment = el("input", { id: "comment-" + n, name: "comment", type: "text", maxlength: "8000",
      placeholder: "Optional" });
    const correction = el("textarea", { id: "correction-" + n, name: "correction", rows: "3",
      maxlength: "8000", placeholder: "Optional: the answer it should have given" });
    const submit = el("button", { type: "submit", text: "Send feedback" });
    const status = el("p", { className: "feedback-status", role: "status" });
    const details = el("form", { className: "feedback-form", hidden: true, "aria-label": "Feedback" },
      el("div", { className: "field" }, el("label", { for: reason.id, text: "Reason" }), reason),
      el("div", { className: "field" }, el("label", { for: comment.id, text: "Comment" }), comment),
      el("div", { className: "field" }, el("label", { for: correction.id, text: "Suggest a better answer" }), correction),
      el("div", { className: "feedback-buttons" }, submit));

    let rating = null;
    const choose = (value) => {
      rating = value;
      up.setAttribute("aria-pressed", String(value === "up"));
      down.setAttribute("aria-pressed", String(value === "down"));
      details.hidden = false;
      status.textContent = "";
      reason.focus();
    };
    up.addEventListener("click", () => choose("up"));
    down.addEventListener("click", () => choose("down"));

    details.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!rating) return;
      const body = { message_id: messageId, rating };
      if (reason.value) body.reason = reason.value;
      if (comment.value.trim()) body.comment = comment.value.trim();
      if (correction.value.trim()) body.correction = correction.value.trim();
      submit.disabled = true;
      status.className = "feedback-status";
      status.textContent = "Sending…";
      try {
        const response = await fetch("v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
        if (!response.ok) throw new Error(await errorMessage(response));
        status.textContent = "Thanks! Your feedback was saved.";
        details.hidden = true;
        up.disabled = down.disabled = true;
      } catch (err) {
        status.className = "feedback-status failed";
        status.textContent = err instanceof TypeError ? networkMessage(err) : err.message;
        submit.disabled = false;
      }
    });

    box.append(thumbs, details, status);
    turn.append(box);
  }

  // ------------------------------------------------------------------ asking

  async function ask(text) {
    clearError();
    const follow = nearBottom();
    const userTurn = addUserTurn(text);
    state.messages.push({ role: "user", content: text });
    const reply = addAssistantTurn();
    if (follow) scrollToEnd();

    const controller = new AbortController();
    const epoch = state.epoch;
    state.controller = controller;
    setStreaming(true);

    const body = { messages: state.messages, stream: true };
    if (state.model) body.model = state.model;
    if (state.conversationId) body.conversation_id = state.conversationId;

    let answer = "";
    let messageId = null;
    let finished = "error";
    let failure = null;
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      if (!response.body) throw new Error("This browser cannot read a streamed reply.");
      const done = await readEvents(response.body, (payload) => {
        let chunk;
        try {
          chunk = JSON.parse(payload);
        } catch (_) {
          return;                                        // not JSON: skip the event
        }
        if (chunk.error) throw new Error(chunk.error.message || "The server stopped the reply.");
        if (typeof chunk.id === "string" && !messageId) messageId = chunk.id;
        if (typeof chunk.conversation_id === "string" && epoch === state.epoch) state.conversationId = chunk.conversation_id;
        if (Array.isArray(chunk.sources) && !reply.turn.querySelector(".sources")) renderSources(reply.turn, chunk.sources);
        const choice = chunk.choices && chunk.choices[0];
        const piece = choice && choice.delta && choice.delta.content;
        if (typeof piece === "string" && piece) {
          const stick = nearBottom();
          answer += piece;
          reply.text.append(piece);                      // a text node: never parsed as HTML
          if (stick) scrollToEnd();
        }
      });
      finished = done ? "done" : "cut";
    } catch (err) {
      if (err && err.name === "AbortError") finished = "stopped";
      else failure = err instanceof TypeError ? networkMessage(err) : (err && err.message) || String(err);
    } finally {
      if (state.controller === controller) {
        state.controller = null;
        setStreaming(false);
      }
    }
    if (epoch !== state.epoch) return;                   // the conversation was cleared meanwhile

    if (finished === "stopped") {
      reply.note.textContent = "Stopped.";
      reply.note.hidden = false;
    } else if (finished === "cut") {
      reply.note.textContent = "The reply ended early: the connection closed before it was complete.";
      reply.note.hidden = false;
    }
    if (failure && !answer) {
      // Nothing came back: take the question off the conversation and put it back in the
      // box, so that it can be asked again (after entering the API key, say).
      showError(failure);
      state.messages.pop();
      userTurn.remove();
      reply.turn.remove();
      if (!question.value) question.value = text;
      if (!log.querySelector(".turn")) log.append(emptyHint());
      return;
    }
    if (failure) {
      reply.note.textContent = failure;
      reply.note.hidden = false;
    }
    if (!answer && finished !== "stopped") reply.text.textContent = "(empty reply)";
    reply.turn.setAttribute("data-state", failure ? "error" : finished);
    if (answer) state.messages.push({ role: "assistant", content: answer });
    else if (state.messages.length && state.messages[state.messages.length - 1].role === "user") state.messages.pop();
    if (messageId) {
      reply.turn.setAttribute("data-message-id", messageId);
      addFeedback(reply.turn, messageId);
    }
  }

  function newConversation() {
    state.epoch += 1;
    if (state.controller) state.controller.abort();
    state.controller = null;
    setStreaming(false);
    state.messages = [];
    state.conversationId = null;
    log.replaceChildren(emptyHint());
    clearError();
    question.value = "";
    question.focus();
  }

  // ------------------------------------------------------------------ wiring

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.controller) return;                        // a reply is still streaming
    const text = question.value.trim();
    if (!text) return;
    question.value = "";
    ask(text);
  });

  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  stopButton.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });

  $("new-conversation").addEventListener("click", newConversation);

  try {
    keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  } catch (_) {
    // storage disabled: the key lives in the field only
  }
  keyInput.addEventListener("input", () => {
    try {
      sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    } catch (_) {
      // ignore
    }
  });

  async function checkHealth() {
    try {
      const response = await fetch("health", { headers: { Accept: "application/json" } });
      const info = await response.json().catch(() => ({}));
      if (info.auth === true) showKeyPanel();
      if (typeof info.model === "string") {
        state.model = info.model;
        $("model-name").textContent = info.model;
      }
      if (!response.ok) showError("The server is not ready (" + response.status + "). Try again in a moment.");
    } catch (err) {
      showError(networkMessage(err));
    }
    document.body.setAttribute("data-ready", "true");
  }

  setStreaming(false);
  checkHealth();
})();
