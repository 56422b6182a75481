// The chat page: streams replies from POST /v1/chat/completions, renders them as Markdown
// (markdown.js), lists their sources, and sends thumbs, reasons and corrected answers to
// POST /v1/feedback (see docs/SERVING.md). The conversation is kept in this tab's session
// storage, so a reload shows it again, votes and all.
//
// Everything the model or the documents wrote reaches the page as text (textContent, text
// nodes, markdown.js's own elements), never as HTML.
"use strict";

(function () {
  const KEY_STORAGE = "chatforge.apiKey";
  const CONVERSATION_STORAGE = "chatforge.conversation";
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
  const counter = $("counter");
  const sendButton = $("send");
  const stopButton = $("stop");
  const errorBox = $("error");
  const keyPanel = $("key-panel");
  const keyInput = $("api-key");
  const markdown = window.chatforgeMarkdown;

  const state = {
    // The conversation as shown: {role: "user", text} and {role: "assistant", text, id, sources,
    // refusal, state, note, vote: {rating, feedbackId}}. What is sent to the server and what is
    // kept in session storage are both made from it.
    turns: [],
    conversationId: null,  // returned by the server's first response
    model: null,           // from GET /health
    maxChars: null,        // the longest message the server takes (GET /health)
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

  // ------------------------------------------------------------------ the conversation, kept

  // The messages the server gets: a reply that ended with no text takes its question with it
  // (the model would otherwise see two user turns in a row).
  function messagesFromTurns(turns) {
    const messages = [];
    for (const t of turns) {
      if (t.role === "user") messages.push({ role: "user", content: t.text });
      else if (t.text) messages.push({ role: "assistant", content: t.text });
      else if (messages.length && messages[messages.length - 1].role === "user") messages.pop();
    }
    return messages;
  }

  function save() {
    try {
      sessionStorage.setItem(CONVERSATION_STORAGE, JSON.stringify(
        { version: 1, conversationId: state.conversationId, turns: state.turns }));
    } catch (_) {
      // storage full or disabled: the conversation lives in this page only
    }
  }

  function load() {
    try {
      const kept = JSON.parse(sessionStorage.getItem(CONVERSATION_STORAGE) || "null");
      if (!kept || kept.version !== 1 || !Array.isArray(kept.turns)) return;
      state.conversationId = typeof kept.conversationId === "string" ? kept.conversationId : null;
      for (const t of kept.turns) {
        if (!t || typeof t.text !== "string") continue;
        if (t.role === "user") {
          state.turns.push({ role: "user", text: t.text });
          addUserTurn(t.text);
        } else if (t.role === "assistant") {
          // A reply that was streaming when the page went away was cut there; the server kept
          // it as stopped, so it still takes feedback.
          const turn = Object.assign({}, t, t.state === "streaming"
            ? { state: "stopped", note: "Stopped: the page was reloaded." } : {});
          state.turns.push(turn);
          showFinished(addAssistantTurn(), turn);
        }
      }
    } catch (_) {
      // unreadable: start afresh
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
    const hint = $("empty-hint");
    if (hint) hint.remove();
    const text = el("div", { className: "text answer" });
    const note = el("p", { className: "note", hidden: true });
    const turn = el("article", { className: "turn assistant", "aria-label": "Assistant", "data-state": "streaming" },
      el("h2", { className: "who", text: "Assistant" }), text, note);
    log.append(turn);
    return { turn, text, note };
  }

  function renderAnswer(view, text) {
    view.text.replaceChildren(markdown.render(text));
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

  // A finished (or stopped, or restored) reply: its text, note, sources and buttons.
  function showFinished(view, t) {
    renderAnswer(view, t.text);
    if (!t.text && t.state !== "stopped") view.text.textContent = "(empty reply)";
    if (t.note) {
      view.note.textContent = t.note;
      view.note.hidden = false;
    }
    // A refusal ("not in the documentation") used none of the passages: none are listed.
    if (t.refusal) view.turn.setAttribute("data-refusal", "true");
    else renderSources(view.turn, t.sources);
    view.turn.setAttribute("data-state", t.state);
    if (t.id) {
      view.turn.setAttribute("data-message-id", t.id);
      addActions(view.turn, t);
    }
  }

  // ------------------------------------------------------------------ copy, feedback

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

  // The clipboard API needs a secure context (https, or this machine); elsewhere the older
  // copy command on a hidden text field does it.
  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = el("textarea", { className: "visually-hidden", readonly: "" });
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) throw new Error("copy failed");
  }

  function addActions(turn, t) {
    const n = ++feedbackCount;
    const copy = el("button", { type: "button", className: "copy", text: "Copy",
      title: "Copy the answer", "aria-label": "Copy answer" });
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
      el("p", { className: "feedback-hint", text: "Tell us more (optional):" }),
      el("div", { className: "field" }, el("label", { for: reason.id, text: "Reason" }), reason),
      el("div", { className: "field" }, el("label", { for: comment.id, text: "Comment" }), comment),
      el("div", { className: "field" }, el("label", { for: correction.id, text: "Suggest a better answer" }), correction),
      el("div", { className: "feedback-buttons" }, submit));

    const vote = t.vote || (t.vote = { rating: null, feedbackId: null });
    const pressed = () => {
      up.setAttribute("aria-pressed", String(vote.rating === "up"));
      down.setAttribute("aria-pressed", String(vote.rating === "down"));
    };
    pressed();

    function say(text, failed) {
      status.className = failed ? "feedback-status failed" : "feedback-status";
      status.textContent = text;
    }

    // Votes go out one at a time, so that a second click updates the row the first one made
    // (feedback_id) instead of adding another.
    let queue = Promise.resolve();
    function send(fields) {
      const job = queue.then(async () => {
        const body = Object.assign({ message_id: t.id, rating: vote.rating }, fields);
        if (vote.feedbackId) body.feedback_id = vote.feedbackId;
        const response = await fetch("v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
        if (!response.ok) throw new Error(await errorMessage(response));
        const stored = await response.json();
        if (stored && Number.isInteger(stored.id)) vote.feedbackId = stored.id;
        save();
      });
      queue = job.catch(() => {});
      return job;
    }

    // One click saves the vote; the form that opens only adds to it.
    async function choose(value) {
      vote.rating = value;
      pressed();
      save();
      details.hidden = false;
      say("Saving…");
      try {
        await send({});
        say("Thanks! Your vote was saved.");
      } catch (err) {
        say(err instanceof TypeError ? networkMessage(err) : err.message, true);
      }
    }
    up.addEventListener("click", () => choose("up"));
    down.addEventListener("click", () => choose("down"));

    details.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!vote.rating) return;
      const fields = {};
      if (reason.value) fields.reason = reason.value;
      if (comment.value.trim()) fields.comment = comment.value.trim();
      if (correction.value.trim()) fields.correction = correction.value.trim();
      submit.disabled = true;
      say("Sending…");
      try {
        await send(fields);
        say("Thanks! Your feedback was saved.");
        details.hidden = true;
      } catch (err) {
        say(err instanceof TypeError ? networkMessage(err) : err.message, true);
      } finally {
        submit.disabled = false;
      }
    });

    copy.addEventListener("click", async () => {
      try {
        await copyText(t.text);
        copy.textContent = "Copied";
      } catch (_) {
        copy.textContent = "Copy failed";
      }
      setTimeout(() => { copy.textContent = "Copy"; }, 2000);
    });

    const bar = el("div", { className: "actions" }, thumbs, copy);
    turn.append(el("div", { className: "feedback" }, bar, status, details));
  }

  // ------------------------------------------------------------------ asking

  async function ask(text) {
    clearError();
    const follow = nearBottom();
    const userTurn = addUserTurn(text);
    const asked = { role: "user", text };
    state.turns.push(asked);
    const body = { messages: messagesFromTurns(state.turns), stream: true };
    if (state.model) body.model = state.model;
    if (state.conversationId) body.conversation_id = state.conversationId;

    const t = { role: "assistant", text: "", id: null, sources: [], refusal: false, state: "streaming", note: "" };
    state.turns.push(t);
    const view = addAssistantTurn();
    if (follow) scrollToEnd();

    const controller = new AbortController();
    const epoch = state.epoch;
    state.controller = controller;
    setStreaming(true);

    // Each piece redraws the answer (Markdown needs the whole text: a "**" may close later);
    // the kept copy is written at most every half second while the reply streams.
    let saving = null;
    const draw = () => {
      const stick = nearBottom();
      renderAnswer(view, t.text);
      if (stick) scrollToEnd();
      if (!saving) saving = setTimeout(() => { saving = null; save(); }, 500);
    };

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
        if (typeof chunk.id === "string" && !t.id) t.id = chunk.id;
        if (typeof chunk.conversation_id === "string" && epoch === state.epoch) state.conversationId = chunk.conversation_id;
        // The first chunk names the passages; the last one may take them back (a refusal).
        if (Array.isArray(chunk.sources)) t.sources = chunk.sources;
        if (chunk.refusal === true) t.refusal = true;
        const choice = chunk.choices && chunk.choices[0];
        const piece = choice && choice.delta && choice.delta.content;
        if (typeof piece === "string" && piece) {
          t.text += piece;
          draw();
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
    clearTimeout(saving);
    if (epoch !== state.epoch) return;                   // the conversation was cleared meanwhile

    if (failure && !t.text) {
      // Nothing came back: take the question off the conversation and put it back in the
      // box, so that it can be asked again (after entering the API key, say).
      showError(failure);
      state.turns = state.turns.filter((x) => x !== asked && x !== t);
      save();
      userTurn.remove();
      view.turn.remove();
      if (!question.value) question.value = text;
      if (!log.querySelector(".turn")) log.append(emptyHint());
      return;
    }
    if (finished === "stopped") t.note = "Stopped.";
    else if (finished === "cut") t.note = "The reply ended early: the connection closed before it was complete.";
    if (failure) t.note = failure;
    t.state = failure ? "error" : finished;
    save();
    showFinished(view, t);
  }

  function newConversation() {
    state.epoch += 1;
    if (state.controller) state.controller.abort();
    state.controller = null;
    setStreaming(false);
    state.turns = [];
    state.conversationId = null;
    save();
    log.replaceChildren(emptyHint());
    clearError();
    question.value = "";
    updateCounter();
    question.focus();
  }

  // ------------------------------------------------------------------ the length limit

  function updateCounter() {
    const limit = state.maxChars;
    if (!limit) {
      counter.hidden = true;
      return false;
    }
    // The text as sent (trimmed). JavaScript counts UTF-16 units, never fewer than the server's
    // characters: what the counter lets through, the server takes.
    const length = question.value.trim().length;
    const over = length > limit;
    counter.hidden = false;
    counter.textContent = over
      ? length + " / " + limit + " characters: shorten it by " + (length - limit) + " to send"
      : length + " / " + limit;
    counter.classList.toggle("over", over);
    counter.classList.toggle("near", !over && length > limit * 0.9);
    question.setAttribute("aria-invalid", String(over));
    return over;
  }

  // ------------------------------------------------------------------ wiring

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.controller) return;                        // a reply is still streaming
    const text = question.value.trim();
    if (!text || updateCounter()) return;                // empty, or longer than the server takes
    question.value = "";
    updateCounter();
    ask(text);
  });

  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  question.addEventListener("input", updateCounter);

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
      if (Number.isInteger(info.max_message_chars) && info.max_message_chars > 0) {
        state.maxChars = info.max_message_chars;
        updateCounter();
      }
      if (!response.ok) showError("The server is not ready (" + response.status + "). Try again in a moment.");
    } catch (err) {
      showError(networkMessage(err));
    }
    document.body.setAttribute("data-ready", "true");
  }

  setStreaming(false);
  load();
  checkHealth();
})();
