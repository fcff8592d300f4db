// The page of `sfllava serve` (design.md §7.6): a client of the server's own API, nothing else.
// It lists the media (/v1/sfllava/media), shows what the model sees (/v1/sfllava/sheet and
// /plan) and chats with design.md §7's request (POST /v1/chat/completions, streamed).
"use strict";

const KEY_STORE = "sfllava-api-key"; // sessionStorage: this tab only
const REDRAW_MS = 250; // options typed in quick succession redraw the sheet once

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
const state = {
  model: null,
  maxUploadBytes: null,
  media: null, // {path, url, kind, upload}: what the next conversation is about
  conversation: null, // {options, maxTokens, messages}: fixed when its first question is sent
  controller: null, // the answer being written, to stop
  sheetUrl: null,
  view: 0, // the latest sheet/plan asked for: older answers are dropped
};

// -- talking to the server -------------------------------------------------------------

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ServerError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: the status line */ }
  if (response.status === 401) askForKey();
  return new ServerError(message, response.status);
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: headers(init.headers) });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// Server-sent events: each `data: ...` block, parsed; ends at [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      buffer = buffer.slice(cut + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

// -- the key -----------------------------------------------------------------------------

function askForKey() {
  document.getElementById("key-form").hidden = false;
  $("api-key").focus();
}

function useKey(event) {
  if (event) event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  showError("");
  loadMedia();
}

// -- the media -----------------------------------------------------------------------------

async function loadMedia() {
  let listed;
  try {
    if (!state.model) {
      const models = await (await api("/v1/models")).json();
      state.model = models.data[0].id;
      document.getElementById("model-name").textContent = state.model;
    }
    listed = await (await api("/v1/sfllava/media")).json();
  } catch (e) {
    showError(e.message);
    return;
  }
  if (sessionStorage.getItem(KEY_STORE)) document.getElementById("key-form").hidden = true;
  state.maxUploadBytes = listed.max_upload_bytes;
  setDefaults(listed.defaults);
  const list = document.getElementById("media-list");
  list.replaceChildren(...listed.data.map((item) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.testid = "video-item";
    button.textContent = item.path;
    button.title = `${item.kind}, ${(item.size / 1e6).toFixed(1)} MB`;
    button.addEventListener("click", () => choose({ ...item, upload: null }, button));
    li.append(button);
    return li;
  }));
  document.getElementById("media-note").textContent = listed.data.length
    ? (listed.truncated ? `the first ${listed.data.length} files` : "")
    : "no videos or pictures in the media folders";
}

let defaultsSet = false;
function setDefaults(d) {
  if (defaultsSet || !d) return;
  defaultsSet = true;
  $("recipe").value = d.recipe;
  $("num-frames").value = d.num_frames ?? "";
  $("fps").value = d.fps ?? "";
  $("start").value = d.start ?? "";
  $("end").value = d.end ?? "";
  if (["auto", "off", "speech"].includes(d.subtitles)) $("subtitles").value = d.subtitles;
  $("timestamps").checked = !!d.timestamps;
}

function choose(media, button) {
  for (const b of document.querySelectorAll('[data-testid="video-item"]')) {
    b.setAttribute("aria-current", String(b === button));
  }
  stop();
  state.media = media;
  document.getElementById("media-name").textContent = media.path;
  newChat();
  redraw();
}

function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const kind = file.type.startsWith("image/") ? "image" : "video";
    choose({ path: file.name, kind, size: file.size, url: reader.result, upload: file }, null);
  };
  reader.onerror = () => showError(`cannot read ${file.name}`);
  reader.readAsDataURL(file); // design.md §7's data URL: data:video/...;base64,...
}

// -- what the model sees -----------------------------------------------------------------

function number(text) {
  const t = text.trim();
  return t === "" ? null : (isNaN(Number(t)) ? t : Number(t));
}

// The `sfllava` object of a request: the options as the controls show them.
function currentOptions() {
  const o = { recipe: $("recipe").value, subtitles: $("subtitles").value,
              timestamps: $("timestamps").checked };
  for (const [name, id] of [["num_frames", "num-frames"], ["fps", "fps"], ["start", "start"],
                            ["end", "end"]]) {
    const value = number($(id).value);
    if (value !== null) o[name] = value;
  }
  return o;
}

let redrawTimer = null;
function optionsChanged() {
  document.getElementById("options-note").hidden = !state.conversation;
  clearTimeout(redrawTimer);
  redrawTimer = setTimeout(redraw, REDRAW_MS);
}

async function redraw() {
  const sheet = $("contact-sheet");
  const view = ++state.view;
  if (!state.media) return;
  if (state.media.upload) { // not on the server yet: read when the question is sent
    sheet.removeAttribute("src");
    sheet.dataset.state = "empty";
    $("visual-tokens").textContent = $("frames").textContent = "–";
    $("memory-plan").textContent = "an upload is read by the server when you send";
    return;
  }
  const query = new URLSearchParams({ path: state.media.url });
  for (const [k, v] of Object.entries(currentOptions())) query.set(k, String(v));
  sheet.dataset.state = "loading";
  try {
    const [plan, png] = await Promise.all([
      api(`/v1/sfllava/plan?${query}`).then((r) => r.json()),
      api(`/v1/sfllava/sheet?${query}`).then((r) => r.blob()),
    ]);
    if (view !== state.view) return;
    $("visual-tokens").textContent = String(plan.visual_tokens);
    $("frames").textContent = plan.num_frames === null ? "a picture" : String(plan.num_frames);
    $("memory-plan").textContent = plan.memory.text;
    if (state.sheetUrl) URL.revokeObjectURL(state.sheetUrl);
    state.sheetUrl = URL.createObjectURL(png);
    await new Promise((done) => { sheet.onload = sheet.onerror = done; sheet.src = state.sheetUrl; });
    sheet.dataset.state = "ready";
    if (!state.controller) showError("");
  } catch (e) {
    if (view !== state.view) return;
    sheet.dataset.state = "error";
    $("visual-tokens").textContent = $("frames").textContent = $("memory-plan").textContent = "–";
    showError(e.message);
  }
}

// -- the chat ----------------------------------------------------------------------------

function addMessage(testid, text) {
  const el = document.createElement("div");
  el.className = "message";
  el.dataset.testid = testid;
  if (text !== undefined) el.textContent = text;
  document.getElementById("messages").append(el);
  return el;
}

function assistantMessage() {
  const el = addMessage("assistant-message");
  el.dataset.state = "streaming";
  const text = document.createElement("div");
  text.dataset.testid = "assistant-text";
  const figures = document.createElement("div");
  figures.className = "figures";
  figures.dataset.testid = "figures";
  el.append(text, figures);
  return { el, text, figures };
}

function showFigures(figures, last) {
  const record = last.sfllava, t = record.timings_s, n = last.usage.completion_tokens;
  const rate = n > 1 && t.generate > 0 ? `${((n - 1) / t.generate).toFixed(1)} tokens/s` : "– tokens/s";
  figures.dataset.cache = record.cache;
  figures.dataset.ttft = String(t.ttft);
  const ttft = t.ttft < 1 ? `${(t.ttft * 1000).toFixed(0)} ms` : `${t.ttft.toFixed(2)} s`;
  figures.textContent = `ttft ${ttft} · ${rate} · cache ${record.cache} · ${n} tokens`;
}

function mediaPart(media) {
  const type = media.kind === "image" ? "image_url" : "video_url";
  return { type, [type]: { url: media.url } };
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  if (event) event.preventDefault();
  const question = $("prompt").value;
  if (!question.trim() || state.controller) return;
  if (!state.media) { showError("choose a video first"); return; }
  showError("");
  if (!state.conversation) { // the options in force now are this conversation's
    const maxTokens = number($("max-tokens").value);
    state.conversation = { options: currentOptions(), maxTokens, messages: [] };
  }
  const conv = state.conversation;
  conv.messages.push({ role: "user", content: conv.messages.length
    ? question : [mediaPart(state.media), { type: "text", text: question }] });
  $("prompt").value = "";
  addMessage("user-message", question);
  const answer = assistantMessage();
  const body = { model: state.model, messages: conv.messages, stream: true, temperature: 0,
                 sfllava: conv.options };
  if (conv.maxTokens) body.max_tokens = conv.maxTokens;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const sent = performance.now();
  let text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw await errorOf(response);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new ServerError(chunk.error.message, 500);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) {
        if (!text) answer.el.dataset.firstMs = (performance.now() - sent).toFixed(1);
        text += delta;
        answer.text.textContent = text;
        answer.el.scrollIntoView({ block: "end" });
      }
      if (chunk.usage) showFigures(answer.figures, chunk);
    }
    conv.messages.push({ role: "assistant", content: text });
    answer.el.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") { // stopped: the answer so far stays in the conversation
      conv.messages.push({ role: "assistant", content: text });
      answer.figures.textContent = "stopped";
      answer.el.dataset.state = "done";
    } else { // the question failed: it leaves the conversation, the page goes on
      conv.messages.pop();
      if (!conv.messages.length) state.conversation = null;
      answer.figures.textContent = "error";
      answer.el.dataset.state = "error";
      showError(e.message);
    }
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.conversation = null;
  document.getElementById("messages").replaceChildren();
  document.getElementById("options-note").hidden = true;
  showError("");
}

// -- wiring ------------------------------------------------------------------------------

document.getElementById("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("upload").addEventListener("change", upload);
document.getElementById("key-form").addEventListener("submit", useKey);
$("api-key").addEventListener("change", useKey);
for (const id of ["recipe", "num-frames", "fps", "start", "end", "subtitles", "timestamps"]) {
  $(id).addEventListener("input", optionsChanged);
  $(id).addEventListener("change", optionsChanged);
}
$("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
loadMedia();
