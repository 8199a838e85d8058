// The participant's workspace: chat beside the document, over one websocket.
//
// Every frame that changes something gets a client sequence number and stays in an outbox (kept in
// localStorage) until the server acknowledges it; after a reconnect the outbox is sent again and
// the server applies each frame once. The server's `state` frame is the whole truth: it is
// rendered as is after every (re)connect. Text from the model or the participant is only ever
// set with textContent, never parsed as HTML: the assistant's Markdown is rendered by building
// elements (paragraphs, headings, lists, emphasis, code) whose text is set as text.
//
// The session is the one of the HttpOnly cookie: this script never sees its token. One tab owns a
// session at a time: opening it in another tab takes it over, and this one is told so and stops
// (its unsent frames are renumbered when it takes the session back).

const app = document.getElementById("app");
const slug = app.dataset.slug;
// The study's pages: `/s/{slug}`, or under the console for a researcher's preview.
const studyPath = app.dataset.path;
const sessionId = app.dataset.session;
const store = {
  key: (name) => `collabllm:${slug}:${sessionId}:${name}`,
  get(name, fallback) {
    try {
      const v = localStorage.getItem(this.key(name));
      return v === null ? fallback : JSON.parse(v);
    } catch {
      return fallback;
    }
  },
  set(name, value) {
    try {
      localStorage.setItem(this.key(name), JSON.stringify(value));
    } catch {
      /* storage full or disabled: the server still has everything acknowledged */
    }
  },
};

const el = (id) => document.getElementById(id);
const messagesEl = el("messages");
const input = el("input");
const docEl = el("document");
const sendBtn = el("send");
const stopBtn = el("stop");
const finishBtn = el("finish");
const regenerateBtn = el("regenerate");

let ws = null;
let state = null;
let nextSeq = store.get("nextSeq", 1);
let outbox = store.get("outbox", []);
let docRev = 0;
let docTimer = null;
let docDirty = false;
let streaming = null; // {seq, el}
let comparing = null; // {seq, texts, bodies, box}
let failed = false; // the last reply failed: "Another reply" becomes "Try again"
let retryMs = 500;
let unavailableRetryMs = 1000;
let superseded = false;
const DOC_SAVE_DELAY_MS = 800;
const RATE_LIMITED_RETRY_MS = 5000;

function notice(text) {
  el("notice").textContent = text || "";
}

function persist() {
  store.set("nextSeq", nextSeq);
  store.set("outbox", outbox);
}

function send(frame) {
  frame.client_seq = nextSeq++;
  // Written while another tab owns the session: never seen by the server, renumbered later.
  if (superseded) frame.refused = true;
  outbox.push(frame);
  persist();
  if (ws && ws.readyState === WebSocket.OPEN && !superseded) ws.send(JSON.stringify(frame));
  return frame.client_seq;
}

function hello() {
  ws.send(JSON.stringify({ type: "hello" }));
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}${studyPath}/ws`);
  ws.onopen = () => {
    retryMs = 500;
    hello();
  };
  ws.onmessage = (e) => {
    let frame;
    try {
      frame = JSON.parse(e.data);
    } catch {
      return;
    }
    handle(frame);
  };
  ws.onclose = () => {
    if (superseded) {
      el("connection").textContent = "Open in another tab";
      return;
    }
    el("connection").textContent = "Reconnecting…";
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 5000);
  };
}

function handle(frame) {
  switch (frame.type) {
    case "state":
      applyState(frame);
      break;
    case "ack":
      unavailableRetryMs = 1000;
      outbox = outbox.filter((f) => f.client_seq !== frame.client_seq);
      persist();
      if (frame.rev) {
        docRev = frame.rev;
        el("saved").textContent = "Saved";
      }
      if (!outbox.some((f) => f.type === "doc_update") && docDirty) scheduleDocSave(0);
      break;
    case "error":
      onError(frame);
      break;
    case "assistant_start":
      // A reply that the last `state` already showed keeps its bubble.
      if (frame.comparison) {
        if (!comparing || comparing.seq !== frame.msg_seq) startComparison(frame.msg_seq, ["", ""]);
      } else if (!streaming || streaming.seq !== frame.msg_seq) {
        startStreaming(frame.msg_seq, "");
      }
      break;
    case "queued":
      showQueued(frame.ahead);
      break;
    case "token":
      showQueued(null);
      if (frame.candidate !== undefined && frame.candidate !== null) {
        if (!comparing || comparing.seq !== frame.msg_seq) startComparison(frame.msg_seq, ["", ""]);
        if (frame.index < comparing.tokens[frame.candidate]) break;
        comparing.tokens[frame.candidate] = frame.index + 1;
        comparing.texts[frame.candidate] += frame.delta;
        renderMarkdown(comparing.bodies[frame.candidate], comparing.texts[frame.candidate]);
        break;
      }
      if (!streaming || streaming.seq !== frame.msg_seq) startStreaming(frame.msg_seq, "");
      // Tokens that the `state` snapshot already held arrive again: skip them.
      if (frame.index < streaming.tokens) break;
      streaming.tokens = frame.index + 1;
      streaming.text += frame.delta;
      renderMarkdown(streaming.body, streaming.text);
      messagesEl.scrollTop = messagesEl.scrollHeight;
      break;
    case "assistant_done":
      showQueued(null);
      if (!streaming || streaming.seq !== frame.msg_seq) startStreaming(frame.msg_seq, "");
      finishStreaming(frame.text, frame.finish_reason);
      // A reply the participant stopped is not a turn.
      if (frame.finish_reason !== "cancelled") state.turn += 1;
      state.phase = frame.phase;
      state.messages.push({ seq: frame.msg_seq, role: "assistant", content: frame.text, finish_reason: frame.finish_reason });
      renderStatus();
      break;
    case "comparison":
      state.phase = "choosing";
      if (!comparing || comparing.seq !== frame.msg_seq) {
        // A regenerated reply: the page shows the pair as the server has it.
        hello();
        break;
      }
      offerChoice(frame.candidates);
      renderStatus();
      break;
    case "rating_request":
      state.phase = "rating";
      showRatings(frame.ratings);
      renderStatus();
      break;
    case "completed":
      showCompleted(frame);
      break;
  }
}

function onError(frame) {
  if (frame.code === "assistant_failed" || frame.code === "assistant_unavailable") {
    // Nothing of the reply was kept (or it never started): its bubble goes, and the button asks
    // for it again.
    if (streaming) streaming.div.remove();
    if (comparing) comparing.box.remove();
    streaming = null;
    comparing = null;
    failed = true;
    showQueued(null);
  }
  if (frame.code === "taken_over") {
    onTakenOver(frame);
    return;
  }
  if (frame.code === "unavailable") {
    // Nothing was saved: the frame stays in the outbox, and the state asked for again sends it
    // once the server can save (applyState resends what it has not acknowledged).
    notice(frame.message);
    setTimeout(() => {
      if (ws && ws.readyState === WebSocket.OPEN && !superseded) hello();
    }, unavailableRetryMs);
    unavailableRetryMs = Math.min(unavailableRetryMs * 2, 10000);
    return;
  }
  if (frame.client_seq) {
    const rejected = outbox.find((f) => f.client_seq === frame.client_seq);
    outbox = outbox.filter((f) => f.client_seq !== frame.client_seq);
    persist();
    if (rejected && rejected.type === "user_message" && !input.value) {
      input.value = rejected.text;
      store.set("draft", input.value);
      removePendingUserMessage(rejected.client_seq);
    }
    if (rejected && rejected.type === "doc_update" && frame.code === "rate_limited") {
      // Saved again later, as a new frame with the document as it is then.
      docDirty = true;
      clearTimeout(docTimer);
      docTimer = setTimeout(saveDocument, RATE_LIMITED_RETRY_MS);
    } else if (rejected && rejected.type === "doc_update") {
      // The document moved on elsewhere: take the server's version.
      hello();
    }
  }
  if (frame.code === "rating_due" && state) state.phase = "rating";
  if (frame.code === "final" || frame.code === "incomplete") el("final-notice").textContent = frame.message;
  notice(frame.message);
  renderStatus();
}

// Another tab opened the session: stop here, keep what was not sent, offer to continue here.
function onTakenOver(frame) {
  if (frame.client_seq) {
    const f = outbox.find((f) => f.client_seq === frame.client_seq);
    if (f) f.refused = true;
    persist();
  }
  if (superseded) return;
  superseded = true;
  el("taken-over").hidden = false;
}

function applyState(s) {
  state = s;
  // Connected once the session's state is here: only then can the page send.
  el("connection").textContent = "Connected";
  nextSeq = Math.max(nextSeq, s.last_client_seq + 1);
  // Frames the server refused because another tab owned the session were never applied: they
  // get numbers after everything the server has.
  for (const f of outbox) {
    if (f.refused) {
      delete f.refused;
      f.client_seq = nextSeq++;
    }
  }
  outbox = outbox.filter((f) => f.client_seq > s.last_client_seq);
  outbox.sort((a, b) => a.client_seq - b.client_seq);
  persist();
  el("task-title").textContent = s.task.title || document.title;
  el("task-kind").textContent = s.task.kind ? `Your task: ${s.task.kind}` : "Your task";
  el("task-instructions").textContent = s.task.instructions;
  messagesEl.replaceChildren();
  streaming = null;
  comparing = null;
  failed = false;
  for (const m of s.messages) addMessage(m.role, m.content, m.seq, null, m.finish_reason);
  if (s.streaming) {
    startStreaming(s.streaming.seq, s.streaming.content);
    streaming.tokens = s.streaming_tokens;
  }
  showQueued(s.queued_ahead);
  if (s.comparison) {
    startComparison(s.comparison.msg_seq, s.comparison.candidates);
    offerChoice(s.comparison.candidates);
  }
  for (const f of outbox) if (f.type === "user_message") addMessage("user", f.text, null, f.client_seq);
  const pendingDoc = [...outbox].reverse().find((f) => f.type === "doc_update");
  docRev = s.document.rev;
  if (pendingDoc) {
    docEl.value = pendingDoc.content;
  } else if (!docDirty) {
    docEl.value = s.document.content;
  }
  countWords();
  if (!input.value) input.value = store.get("draft", "");
  for (const f of outbox) if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(f));
  if (s.phase === "rating" && s.pending_ratings.length) showRatings(s.pending_ratings);
  else el("rating").hidden = true;
  if (s.phase === "final") showFinal();
  if (s.completed) showCompleted(s.completed);
  renderStatus();
}

// Markdown, as far as replies use it, rendered into `container` without ever parsing HTML:
// blank-line paragraphs, # headings, - / * / 1. lists, ``` code blocks, **bold**, *italic*, `code`;
// a link shows its text. Anything else stays the text it is.
function renderMarkdown(container, text) {
  const blocks = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.trimStart().startsWith("```")) {
      const code = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith("```"); i++) code.push(lines[i]);
      const pre = document.createElement("pre");
      pre.textContent = code.join("\n");
      blocks.push(pre);
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const item = /^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/.exec(line);
    if (heading) {
      const h = document.createElement(`h${Math.min(heading[1].length + 2, 6)}`);
      inline(h, heading[2]);
      blocks.push(h);
    } else if (item) {
      const kind = item[1] ? "ul" : "ol";
      let list = blocks[blocks.length - 1];
      if (!list || list.tagName.toLowerCase() !== kind || list.dataset.closed) {
        list = document.createElement(kind);
        if (kind === "ol" && item[2] !== "1") list.start = Number(item[2]);
        blocks.push(list);
      }
      const li = document.createElement("li");
      inline(li, item[3]);
      list.append(li);
    } else if (!line.trim()) {
      const last = blocks[blocks.length - 1];
      if (last) last.dataset.closed = "1";
    } else {
      let p = blocks[blocks.length - 1];
      if (p && p.tagName === "P" && !p.dataset.closed) {
        p.append(document.createElement("br"));
      } else {
        p = document.createElement("p");
        blocks.push(p);
      }
      inline(p, line);
    }
  }
  for (const b of blocks) delete b.dataset.closed;
  container.replaceChildren(...blocks);
}

// **bold**, *italic* / _italic_, `code` and [text](link) → text, appended to `parent` as elements.
function inline(parent, text) {
  const pattern = /(\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|_([^_\s][^_]*)_|`([^`]+)`|\[([^\]]+)\]\([^)\s]*\))/g;
  let at = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > at) parent.append(text.slice(at, m.index));
    let node;
    if (m[2] || m[3]) {
      node = document.createElement("strong");
      node.textContent = m[2] || m[3];
    } else if (m[4] || m[5]) {
      node = document.createElement("em");
      node.textContent = m[4] || m[5];
    } else if (m[6]) {
      node = document.createElement("code");
      node.textContent = m[6];
    } else {
      node = document.createTextNode(m[7]);
    }
    parent.append(node);
    at = m.index + m[0].length;
  }
  if (at < text.length) parent.append(text.slice(at));
}

// A message body: the assistant's Markdown rendered, anything else as typed.
function setBody(body, role, text) {
  if (role === "assistant") renderMarkdown(body, text);
  else body.textContent = text;
}

function addMessage(role, text, seq, pendingSeq, finishReason) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (pendingSeq) div.dataset.pending = pendingSeq;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  setBody(body, role, text);
  div.append(who, body);
  if (finishReason) addFinishNote(div, finishReason);
  if (role === "assistant" && seq) addInsertButton(div, seq, () => text);
  messagesEl.append(div);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return { div, body };
}

function removePendingUserMessage(clientSeq) {
  const div = messagesEl.querySelector(`[data-pending="${clientSeq}"]`);
  if (div) div.remove();
}

function addInsertButton(div, seq, textOf) {
  const btn = document.createElement("button");
  btn.type = "button";
  btn.className = "insert";
  btn.textContent = "Insert into document";
  btn.addEventListener("click", () => insertIntoDocument(textOf(), seq));
  div.append(btn);
}

// A reply waiting for the assistant says where it is in line; nothing once it is being written.
function showQueued(ahead) {
  let says = "";
  if (ahead === 0) says = "Your reply is next in line and starts in a moment.";
  else if (typeof ahead === "number") says = `Your reply is in line: ${ahead} ${ahead === 1 ? "reply is" : "replies are"} ahead of it.`;
  el("queue").textContent = says;
}

function startStreaming(seq, text) {
  failed = false;
  const { div, body } = addMessage("assistant", text, null);
  streaming = { seq, text, div, body, tokens: 0 };
  renderStatus();
}

// A comparison turn: two replies side by side, then the participant's pick.
function startComparison(seq, texts) {
  const box = document.createElement("div");
  box.className = "comparison";
  const bodies = texts.map((text, i) => {
    const div = document.createElement("div");
    div.className = "msg assistant candidate";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = `Reply ${i === 0 ? "A" : "B"}`;
    const body = document.createElement("div");
    body.className = "body";
    renderMarkdown(body, text);
    div.append(who, body);
    box.append(div);
    return body;
  });
  messagesEl.append(box);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  failed = false;
  comparing = { seq, texts: [...texts], bodies, box, tokens: [0, 0] };
  renderStatus();
}

function offerChoice(texts) {
  comparing.texts = [...texts];
  comparing.bodies.forEach((b, i) => renderMarkdown(b, texts[i]));
  const choices = document.createElement("div");
  choices.className = "choices";
  const ask = document.createElement("p");
  ask.textContent = "Which reply is better?";
  choices.append(ask);
  for (const [choice, label] of [["a", "A is better"], ["b", "B is better"], ["tie", "Both equally good"], ["both_bad", "Both are bad"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.choice = choice;
    b.textContent = label;
    b.addEventListener("click", () => {
      for (const other of choices.querySelectorAll("button")) other.disabled = true;
      send({ type: "choose", choice });
    });
    choices.append(b);
  }
  comparing.box.append(choices);
  messagesEl.scrollTop = messagesEl.scrollHeight;
}

// Why a reply ended early, said under it: stopped by the participant, or cut at the length limit.
function addFinishNote(div, reason) {
  const says = { cancelled: "(stopped)", length: "(cut off: the reply reached its length limit)" };
  if (!says[reason]) return;
  const note = document.createElement("span");
  note.className = "who";
  note.textContent = says[reason];
  div.append(note);
}

function finishStreaming(text, reason) {
  renderMarkdown(streaming.body, text);
  addFinishNote(streaming.div, reason);
  addInsertButton(streaming.div, streaming.seq, () => text);
  // The note and the button are below what was in view.
  messagesEl.scrollTop = messagesEl.scrollHeight;
  streaming = null;
  renderStatus();
}

function renderStatus() {
  if (!state) return;
  const busy = streaming !== null || comparing !== null;
  const chatting = state.phase === "chatting";
  el("turns").textContent = `Turn ${state.turn} of at least ${state.min_turns}`;
  sendBtn.disabled = busy || !chatting;
  // Stop is for a reply being written, not for a choice between written ones.
  stopBtn.hidden = !(streaming !== null || (comparing !== null && state.phase !== "choosing"));
  input.disabled = !(chatting || state.phase === "rating");
  finishBtn.disabled = busy || !chatting || state.turn < state.min_turns;
  const left = state.min_turns - state.turn;
  el("finish-hint").textContent =
    left > 0 ? `You can finish after ${left} more turn${left === 1 ? "" : "s"}.` : "";
  const last = state.messages[state.messages.length - 1];
  regenerateBtn.textContent = failed ? "Try again" : "Another reply";
  regenerateBtn.disabled = busy || !chatting || (!failed && (!last || last.role !== "assistant"));
}

function countWords() {
  const words = docEl.value.trim().split(/\s+/).filter(Boolean).length;
  el("words").textContent = `${words} word${words === 1 ? "" : "s"}`;
}

function scheduleDocSave(delay) {
  docDirty = true;
  el("saved").textContent = "Saving…";
  clearTimeout(docTimer);
  docTimer = setTimeout(saveDocument, delay);
}

function saveDocument(insertedMessage) {
  // One document update in flight at a time: the next one builds on its revision.
  if (outbox.some((f) => f.type === "doc_update")) {
    docDirty = true;
    return;
  }
  const content = docEl.value;
  if (new Blob([content]).size > state.max_document_bytes) {
    notice(`The document is too long (at most ${state.max_document_bytes} bytes).`);
    return;
  }
  docDirty = false;
  const frame = { type: "doc_update", base_rev: docRev, content };
  if (insertedMessage) frame.inserted_message = insertedMessage;
  send(frame);
}

function insertIntoDocument(text, seq) {
  const at = docEl.selectionStart ?? docEl.value.length;
  const before = docEl.value.slice(0, at);
  const after = docEl.value.slice(docEl.selectionEnd ?? at);
  const sep = before && !before.endsWith("\n") ? "\n\n" : "";
  docEl.value = before + sep + text + after;
  countWords();
  clearTimeout(docTimer);
  if (outbox.some((f) => f.type === "doc_update")) {
    docDirty = true;
  } else {
    saveDocument(seq);
  }
}

function scaleQuestion(container, r, onPick) {
  const wrap = document.createElement("div");
  wrap.className = "question";
  const q = document.createElement("p");
  q.textContent = r.question;
  const scale = document.createElement("div");
  scale.className = "scale";
  scale.setAttribute("role", "group");
  for (let v = r.min; v <= r.max; v++) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = String(v);
    b.dataset.value = String(v);
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => {
      for (const other of scale.children) other.setAttribute("aria-pressed", "false");
      b.setAttribute("aria-pressed", "true");
      onPick(v);
    });
    scale.append(b);
  }
  const labels = document.createElement("div");
  labels.className = "scale-labels";
  const lo = document.createElement("span");
  lo.textContent = r.min_label;
  const hi = document.createElement("span");
  hi.textContent = r.max_label;
  labels.append(lo, hi);
  wrap.append(q, scale, labels);
  wrap.dataset.key = r.key;
  container.append(wrap);
}

function showRatings(ratings) {
  const box = el("rating-questions");
  box.replaceChildren();
  const picked = {};
  const submit = el("rating-submit");
  submit.disabled = true;
  for (const r of ratings) {
    scaleQuestion(box, r, (v) => {
      picked[r.key] = v;
      submit.disabled = Object.keys(picked).length < ratings.length;
    });
  }
  submit.onclick = () => {
    for (const r of ratings) send({ type: "rating", key: r.key, value: picked[r.key] });
    el("rating").hidden = true;
    // The server applies frames in order, so a message sent now comes after the ratings.
    state.phase = "chatting";
    renderStatus();
  };
  el("rating").hidden = false;
}

function showFinal() {
  const box = el("final-questions");
  if (box.dataset.ready) {
    el("final").hidden = false;
    return;
  }
  box.dataset.ready = "1";
  const ratings = {};
  for (const r of state.final_ratings) {
    scaleQuestion(box, r, (v) => {
      ratings[r.key] = v;
      // The note asked for this answer: it is given now.
      if (!state.final_ratings.some((q) => ratings[q.key] === undefined)) el("final-notice").textContent = "";
    });
  }
  const answers = {};
  for (const q of state.questionnaire) {
    const wrap = document.createElement("div");
    wrap.className = "question";
    const label = document.createElement("label");
    label.textContent = q.prompt + (q.required ? "" : " (optional)");
    const ta = document.createElement("textarea");
    ta.maxLength = q.max_chars;
    ta.dataset.key = q.key;
    ta.value = store.get(`answer:${q.key}`, "");
    ta.addEventListener("input", () => store.set(`answer:${q.key}`, ta.value));
    label.append(document.createElement("br"), ta);
    wrap.append(label);
    box.append(wrap);
  }
  el("final-submit").onclick = () => {
    for (const ta of box.querySelectorAll("textarea")) answers[ta.dataset.key] = ta.value;
    const missing = state.final_ratings.find((r) => ratings[r.key] === undefined);
    if (missing) {
      el("final-notice").textContent = `Please answer: ${missing.question}`;
      return;
    }
    el("final-notice").textContent = "Saving…";
    send({ type: "final_answers", ratings, answers });
  };
  el("final").hidden = false;
}

function showCompleted(c) {
  el("final").hidden = true;
  el("rating").hidden = true;
  el("completed-message").textContent = c.message;
  el("completion-code").textContent = c.code;
  const link = el("completion-link");
  // A researcher's preview goes back to no study platform.
  if (c.redirect && !app.dataset.preview) {
    link.href = c.redirect;
    link.hidden = false;
  }
  el("completed").hidden = false;
  store.set("outbox", []);
}

el("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || sendBtn.disabled) return;
  if (new Blob([text]).size > state.max_message_bytes) {
    notice(`Messages may be at most ${state.max_message_bytes} bytes.`);
    return;
  }
  notice("");
  const seq = send({ type: "user_message", text });
  addMessage("user", text, null, seq);
  input.value = "";
  store.set("draft", "");
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    el("composer").requestSubmit();
  }
});
input.addEventListener("input", () => store.set("draft", input.value));
stopBtn.addEventListener("click", () => send({ type: "stop" }));
regenerateBtn.addEventListener("click", () => {
  regenerateBtn.disabled = true;
  send({ type: "regenerate" });
});
finishBtn.addEventListener("click", () => send({ type: "finish" }));
docEl.addEventListener("input", () => {
  countWords();
  scheduleDocSave(DOC_SAVE_DELAY_MS);
});
// Text typed just before the page is hidden or closed is saved at once: over the socket when the
// page is hidden, and with a beacon (which outlives the page) when it goes away.
function flushDocument() {
  if (!state || !docDirty || outbox.some((f) => f.type === "doc_update")) return;
  clearTimeout(docTimer);
  saveDocument();
}
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "hidden") flushDocument();
});
window.addEventListener("pagehide", () => {
  flushDocument();
  const pending = outbox.filter((f) => !f.refused);
  if (superseded || !pending.length) return;
  // text/plain: a type every browser lets a beacon carry; the server reads the bytes as JSON.
  const body = new Blob([JSON.stringify(pending)], { type: "text/plain" });
  navigator.sendBeacon(`${studyPath}/frames`, body);
});
el("use-here").addEventListener("click", () => {
  // This tab's own unsent frames are in memory; the next `state` renumbers them.
  superseded = false;
  el("taken-over").hidden = true;
  connect();
});
for (const kind of ["focus", "blur"]) {
  window.addEventListener(kind, () => send({ type: "event", kind, data: { at: Date.now() } }));
}
document.addEventListener("visibilitychange", () =>
  send({ type: "event", kind: `visibility_${document.visibilityState}`, data: { at: Date.now() } }),
);

connect();
