// Docent's chat page: plain JavaScript, no build step, nothing loaded from elsewhere.
// Model and document text is only ever put on the page with textContent.
"use strict";

(() => {
  const KEY_STORE = "docent.apiKey";
  const MODE_STORE = "docent.mode";
  const BEGIN_QUOTE = "##begin_quote##";
  const END_QUOTE = "##end_quote##";

  const $ = (id) => document.getElementById(id);
  const els = {
    key: $("api-key"),
    mode: $("mode"),
    session: $("session"),
    newConversation: $("new-conversation"),
    log: $("log"),
    empty: $("empty"),
    composer: $("composer"),
    message: $("message"),
    send: $("send"),
    stop: $("stop"),
    ready: $("ready"),
    template: $("turn-template"),
  };

  // One conversation per chat mode; Ask mode has none.
  const sessions = { tutor: null, support: null };
  let inFlight = null; // the AbortController of the request being answered

  // Settings --------------------------------------------------------------------------------
  function storageGet(name) {
    try {
      return window.localStorage.getItem(name);
    } catch {
      return null; // storage disabled: the page still works, it just forgets
    }
  }

  function storageSet(name, value) {
    try {
      if (value) window.localStorage.setItem(name, value);
      else window.localStorage.removeItem(name);
    } catch {
      /* storage disabled */
    }
  }

  els.key.value = storageGet(KEY_STORE) || "";
  els.key.addEventListener("input", () => storageSet(KEY_STORE, els.key.value.trim()));

  const savedMode = storageGet(MODE_STORE);
  if (savedMode && [...els.mode.options].some((o) => o.value === savedMode)) {
    els.mode.value = savedMode;
  }
  els.mode.addEventListener("change", () => {
    storageSet(MODE_STORE, els.mode.value);
    showSession();
  });

  function showSession() {
    const mode = els.mode.value;
    let text;
    let id = "";
    if (mode === "ask") {
      text = "one-off questions";
    } else if (sessions[mode]) {
      id = sessions[mode];
      text = id;
    } else {
      text = "new (starts with your next message)";
    }
    els.session.textContent = text;
    els.session.dataset.sessionId = id;
    els.newConversation.disabled = mode !== "ask" && !sessions[mode] && !els.log.querySelector(".turn");
  }

  els.newConversation.addEventListener("click", () => {
    const mode = els.mode.value;
    if (mode !== "ask") sessions[mode] = null;
    for (const turn of els.log.querySelectorAll(".turn")) turn.remove();
    els.empty.hidden = false;
    showSession();
    els.message.focus();
  });

  // Readiness, for the header line: no key needed.
  async function checkReady() {
    try {
      const r = await fetch("readyz", { cache: "no-store" });
      const body = await r.json();
      if (body.ready) {
        const parts = [`${body.chunks} passages`, shortModel(body.model)];
        if (body.adapter) parts.push(`adapter ${body.adapter}`);
        els.ready.textContent = `Ready · ${parts.join(" · ")}`;
        els.ready.dataset.ready = "true";
      } else {
        els.ready.textContent = `Not ready: ${body.detail || "no index"}`;
        els.ready.dataset.ready = "false";
      }
    } catch {
      els.ready.textContent = "The server did not answer the readiness check.";
      els.ready.dataset.ready = "false";
    }
  }

  // Sending ---------------------------------------------------------------------------------
  els.message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  els.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  els.stop.addEventListener("click", () => inFlight && inFlight.abort());

  function headers(accept = "application/json") {
    const h = { "Content-Type": "application/json", Accept: accept };
    const key = els.key.value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function busy(on) {
    els.send.disabled = on;
    els.stop.hidden = !on;
    els.mode.disabled = on;
    els.newConversation.disabled = on;
    if (!on) showSession();
  }

  async function send() {
    const text = els.message.value.trim();
    if (!text || inFlight) return;
    const mode = els.mode.value;
    const turn = new Turn(text, mode);
    els.message.value = "";
    const [path, body] =
      mode === "ask"
        ? ["v1/ask", { question: text, stream: true }]
        : ["v1/chat", { message: text, mode, session_id: sessions[mode], stream: true }];
    if (body.session_id === null) delete body.session_id;

    const controller = new AbortController();
    inFlight = controller;
    busy(true);
    try {
      const r = await fetch(path, {
        method: "POST",
        headers: headers("text/event-stream, application/json"),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!r.ok) {
        turn.fail(await errorDetail(r), r.status);
        return;
      }
      const type = r.headers.get("content-type") || "";
      if (!type.startsWith("text/event-stream")) {
        turn.finish(await r.json()); // a server that ignored stream: still show the answer
      } else {
        await readEvents(r.body, (event, data) => turn.on(event, data));
        if (turn.state === "streaming") turn.fail("the answer stream ended early", 0);
      }
      if (turn.answer && turn.answer.session_id && mode !== "ask") {
        sessions[mode] = turn.answer.session_id;
      }
    } catch (err) {
      if (err && err.name === "AbortError") turn.fail("stopped", 0);
      else turn.fail(`could not reach the server (${err && err.message ? err.message : err})`, 0);
    } finally {
      inFlight = null;
      busy(false);
      els.message.focus();
    }
  }

  async function errorDetail(response) {
    let detail = "";
    try {
      const body = await response.json();
      detail = body && body.detail;
      if (typeof detail !== "string") detail = JSON.stringify(detail);
    } catch {
      /* not JSON */
    }
    return detail || response.statusText || "request failed";
  }

  // Server-sent events over fetch: EventSource cannot POST.
  async function readEvents(stream, onEvent) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    const dispatch = (block) => {
      let event = "message";
      const data = [];
      for (const line of block.split(/\r\n|\r|\n/)) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
      if (!data.length) return;
      let parsed;
      try {
        parsed = JSON.parse(data.join("\n"));
      } catch {
        parsed = { text: data.join("\n") };
      }
      onEvent(event, parsed);
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = blocks.pop();
      for (const block of blocks) dispatch(block);
    }
    if (buffer.trim()) dispatch(buffer);
  }

  // One question and its answer -------------------------------------------------------------
  class Turn {
    constructor(question, mode) {
      const node = els.template.content.firstElementChild.cloneNode(true);
      this.node = node;
      this.mode = mode;
      this.state = "streaming";
      this.answer = null;
      this.raw = "";
      this.deltas = 0;
      this.chunks = [];
      this.el = node.querySelector(".answer");
      node.dataset.mode = mode;
      node.querySelector(".question .text").textContent = question;
      this.part = (selector) => node.querySelector(selector);
      els.empty.hidden = true;
      els.log.append(node);
      node.scrollIntoView({ block: "end" });
      this.part(".chunk-close").addEventListener("click", () => this.closeChunk());
    }

    on(event, data) {
      if (event === "retrieval") this.sources(data.chunks || []);
      else if (event === "delta") this.delta(data.text || "");
      else if (event === "answer") this.finish(data);
      else if (event === "error") this.fail(data.detail || "the answer failed", data.status || 0);
    }

    delta(text) {
      this.deltas += 1;
      this.el.dataset.deltas = String(this.deltas);
      this.raw += text;
      this.part(".status").textContent = "Writing…";
      // Quote markers may be split across deltas: render from the whole text each time.
      this.part(".live").textContent = this.raw
        .split(BEGIN_QUOTE).join("“")
        .split(END_QUOTE).join("”");
      this.node.scrollIntoView({ block: "end" });
    }

    sources(chunks) {
      this.chunks = chunks;
      const list = this.part(".sources");
      list.replaceChildren();
      for (const chunk of chunks) {
        const li = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.className = "source";
        button.dataset.testid = "source";
        button.dataset.chunkId = chunk.chunk_id;
        button.textContent = where(chunk);
        button.title = `score ${Number(chunk.score).toFixed(3)}`;
        button.setAttribute("aria-expanded", "false");
        button.addEventListener("click", () => this.toggleChunk(chunk, null, button));
        li.append(button);
        list.append(li);
      }
      this.part(".sources-box").hidden = chunks.length === 0;
      this.part(".status").textContent = chunks.length
        ? `Found ${chunks.length} passage${chunks.length === 1 ? "" : "s"}; thinking…`
        : "No passages found; thinking…";
    }

    finish(answer) {
      this.answer = answer;
      this.state = "done";
      if (answer.chunks && answer.chunks.length) this.sources(answer.chunks);
      const el = this.el;
      el.dataset.state = "done";
      el.dataset.answerId = answer.id || "";
      el.dataset.declined = String(Boolean(answer.declined));
      el.dataset.sessionId = answer.session_id || "";
      el.removeAttribute("aria-busy");
      this.part(".status").hidden = true;
      this.part(".live").hidden = true;
      this.part(".final").hidden = false;

      const badges = this.part(".badges");
      badges.replaceChildren();
      if (answer.declined) badges.append(badge("Declined", "declined", "declined-badge"));
      else if (answer.ungrounded) {
        // No retrieved passage states this answer: say so rather than pass it off as sourced.
        badges.append(badge("Not supported by the documents", "ungrounded", "ungrounded-badge"));
      } else if (answer.grounded) badges.append(badge("Grounded", "grounded", "grounded-badge"));
      else if ((answer.unsupported_quotes || []).length) {
        badges.append(badge("Unverified quotes", "unverified", "unverified-badge"));
      } else badges.append(badge("No quotes", "unquoted", "unquoted-badge"));
      if (answer.finish_reason === "length") {
        badges.append(badge("Cut short", "cut", "cut-badge"));
      }
      // Weak models may skip the <ANSWER>: line; then the answer is the whole text, markers too.
      withQuotes(this.part(".final > .text"), answer.answer || "");

      const reasoning = this.part(".reasoning");
      reasoning.hidden = !answer.reasoning;
      withQuotes(this.part(".reasoning-text"), answer.reasoning || "");

      const list = this.part(".citations");
      list.replaceChildren();
      for (const c of answer.citations || []) {
        const li = document.createElement("li");
        li.dataset.testid = "citation";
        const chunk = this.chunks.find((h) => h.chunk_id === c.chunk_id) || null;
        const button = document.createElement("button");
        button.type = "button";
        button.className = "source";
        button.dataset.chunkId = c.chunk_id;
        button.textContent = where(c);
        button.setAttribute("aria-expanded", "false");
        button.disabled = !chunk;
        button.addEventListener("click", () => this.toggleChunk(chunk, c.quote, button));
        const quote = document.createElement("blockquote");
        quote.textContent = c.quote;
        li.append(button);
        if (c.kind === "attributed") {
          // The model did not quote this; Docent found the sentence that states its answer.
          li.dataset.kind = "attributed";
          const label = document.createElement("span");
          label.className = "label";
          label.textContent = " supporting sentence (found by Docent, not quoted)";
          li.append(label);
        }
        li.append(quote);
        list.append(li);
      }
      for (const q of answer.unsupported_quotes || []) {
        const li = document.createElement("li");
        li.className = "unsupported";
        li.dataset.testid = "unsupported-quote";
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = "Not found in the passages: ";
        const quote = document.createElement("q");
        quote.textContent = q;
        li.append(label, quote);
        list.append(li);
      }
      this.part(".citations-box").hidden = !list.children.length;

      const meta = [];
      if (answer.session_id) meta.push(`session ${answer.session_id}`);
      if (answer.model) {
        const model = shortModel(answer.model);
        meta.push(answer.adapter ? `${model} + ${answer.adapter}` : model);
      }
      if (answer.timings && answer.timings.total_ms != null) {
        meta.push(`${(answer.timings.total_ms / 1000).toFixed(1)} s`);
      }
      this.part(".meta").textContent = meta.join(" · ");
      if (answer.id) this.feedback(answer.id);
    }

    fail(detail, status) {
      this.state = "error";
      const el = this.el;
      el.dataset.state = "error";
      el.dataset.status = String(status || "");
      el.removeAttribute("aria-busy");
      this.part(".status").hidden = true;
      if (!this.raw) this.part(".live").hidden = true;
      const error = this.part(".error");
      error.textContent = status ? `Error ${status}: ${detail}` : `Error: ${detail}`;
      error.hidden = false;
    }

    toggleChunk(chunk, quote, button) {
      const view = this.part(".chunk");
      const open = !view.hidden && view.dataset.chunkId === chunk.chunk_id &&
        view.dataset.quote === (quote || "");
      for (const b of this.node.querySelectorAll("button.source")) {
        b.setAttribute("aria-expanded", "false");
      }
      if (open) {
        this.closeChunk();
        return;
      }
      view.dataset.chunkId = chunk.chunk_id;
      view.dataset.quote = quote || "";
      this.part(".chunk-title").textContent = `${where(chunk)} (score ${Number(chunk.score).toFixed(3)})`;
      highlight(this.part(".chunk-text"), chunk.text || "", quote);
      view.hidden = false;
      button.setAttribute("aria-expanded", "true");
    }

    closeChunk() {
      this.part(".chunk").hidden = true;
      for (const b of this.node.querySelectorAll("button.source")) {
        b.setAttribute("aria-expanded", "false");
      }
    }

    feedback(answerId) {
      const box = this.part(".feedback");
      const up = this.part(".up");
      const down = this.part(".down");
      const form = this.part(".correction");
      const status = this.part(".feedback-status");
      box.hidden = false;

      const post = async (rating, correction) => {
        const body = { answer_id: answerId, rating };
        if (correction) body.correction = correction;
        up.disabled = down.disabled = true;
        status.textContent = "Sending…";
        try {
          const r = await fetch("v1/feedback", {
            method: "POST",
            headers: headers(),
            body: JSON.stringify(body),
          });
          if (!r.ok) throw new Error(`Error ${r.status}: ${await errorDetail(r)}`);
          up.setAttribute("aria-pressed", String(rating === 1));
          down.setAttribute("aria-pressed", String(rating === -1));
          form.hidden = true;
          status.textContent = "Thanks!";
          status.dataset.state = "sent";
        } catch (err) {
          status.textContent = err.message || String(err);
          status.dataset.state = "error";
          up.disabled = down.disabled = false;
        }
      };

      up.addEventListener("click", () => post(1, null));
      down.addEventListener("click", () => {
        form.hidden = !form.hidden;
        down.setAttribute("aria-expanded", String(!form.hidden));
        if (!form.hidden) form.querySelector("textarea").focus();
      });
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        post(-1, form.querySelector("textarea").value.trim());
      });
    }
  }

  // Helpers ---------------------------------------------------------------------------------
  function where(item) {
    let text = item.source || "?";
    if (item.section) text += ` § ${item.section}`;
    if (item.page != null) text += ` (p. ${item.page})`;
    return text;
  }

  // Engines may name the model by its local path: show the last part.
  function shortModel(model) {
    return String(model || "").split(/[\\/]/).filter(Boolean).pop() || "?";
  }

  function badge(text, kind, testid) {
    const span = document.createElement("span");
    span.className = `badge ${kind}`;
    span.dataset.testid = testid;
    span.textContent = text;
    return span;
  }

  // Text with ##begin_quote##…##end_quote## spans shown as quotes.
  function withQuotes(target, text) {
    target.replaceChildren();
    const parts = text.split(BEGIN_QUOTE);
    target.append(document.createTextNode(parts[0]));
    for (const part of parts.slice(1)) {
      const end = part.indexOf(END_QUOTE);
      const q = document.createElement("q");
      q.textContent = end < 0 ? part : part.slice(0, end);
      target.append(q);
      if (end >= 0) target.append(document.createTextNode(part.slice(end + END_QUOTE.length)));
    }
  }

  // A chunk's text with the cited quote marked, when it can be found as is.
  function highlight(target, text, quote) {
    target.replaceChildren();
    const at = quote ? text.toLowerCase().indexOf(quote.toLowerCase()) : -1;
    if (at < 0) {
      target.textContent = text;
      return;
    }
    const mark = document.createElement("mark");
    mark.textContent = text.slice(at, at + quote.length);
    target.append(text.slice(0, at), mark, text.slice(at + quote.length));
  }

  showSession();
  checkReady();
})();
