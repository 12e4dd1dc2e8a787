// tuneserve chat: a plain page over the app's own /v1 API. History stays in this browser (localStorage);
// an API key, if the server wants one, only in this tab (sessionStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "tuneserve-history";
const API_KEY = "tuneserve-api-key";

const state = {
  history: JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]"), // {role, content, stats?, error?}
  models: [],
  controller: null,
};

// -- safe rendering: everything is escaped first; only our own tags are added afterwards -------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function renderInline(text) {
  return escapeHtml(text)
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
    .replace(/\n/g, "<br>");
}

function renderMarkdown(text) {
  // Fenced code blocks (```lang ... ```), an unterminated one too while it streams in.
  const parts = text.split(/```/);
  return parts.map((part, i) => {
    if (i % 2 === 0) return renderInline(part);
    const code = part.replace(/^[\w+-]*\n/, "");
    return `<pre><code>${escapeHtml(code)}</code></pre>`;
  }).join("");
}

// -- API ---------------------------------------------------------------------------------------------

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(API_KEY);
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `Error ${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `Error ${response.status}: ${response.statusText || "request failed"}`;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", {headers: headers()});
  } catch (err) {
    showError(`Cannot reach the server: ${err.message}`);
    return;
  }
  if (response.status === 401) {
    $("key-box").hidden = false;
    showError(await errorText(response));
    return;
  }
  if (!response.ok) { showError(await errorText(response)); return; }
  state.models = (await response.json()).data;
  const select = $("model");
  const previous = select.value;
  select.innerHTML = "";
  for (const model of state.models) {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = `${model.id} — ${where(model)}`;
    select.appendChild(option);
  }
  if (previous && state.models.some((m) => m.id === previous)) select.value = previous;
  describeModel();
}

function where(model) {
  if (model.alias_of) return `alias of ${model.alias_of.join(" → ")}`;
  const providers = model.providers || [model.owned_by];
  return providers.map((p) => (p === "local" ? "local engine" : `remote: ${p}`)).join(", ");
}

function describeModel() {
  const model = state.models.find((m) => m.id === $("model").value);
  $("model-info").textContent = model ? `Runs on: ${where(model)}` : "";
  if (model && model.max_model_len) $("max-tokens").max = model.max_model_len;
}

// -- chat ----------------------------------------------------------------------------------------------

function save() { localStorage.setItem(HISTORY_KEY, JSON.stringify(state.history)); }

function render() {
  const box = $("messages");
  box.innerHTML = "";
  for (const entry of state.history) box.appendChild(bubble(entry));
  box.scrollTop = box.scrollHeight;
}

function bubble(entry) {
  const div = document.createElement("div");
  div.className = `message ${entry.error ? "error" : entry.role}`;
  div.innerHTML = `<div class="role"></div><div class="content"></div><div class="stats"></div>`;
  div.querySelector(".role").textContent = entry.error ? "error" : entry.role;
  div.querySelector(".content").innerHTML = entry.error ? escapeHtml(entry.content) : renderMarkdown(entry.content);
  div.querySelector(".stats").textContent = entry.stats || "";
  return div;
}

function showError(message) {
  state.history.push({role: "assistant", content: message, error: true});
  save();
  render();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  const model = $("model").value;
  if (!model) { showError("No model selected: the model list could not be loaded."); return; }
  state.history.push({role: "user", content: text});
  const reply = {role: "assistant", content: ""};
  state.history.push(reply);
  save();
  render();
  const view = $("messages").lastElementChild;
  const content = view.querySelector(".content");
  const stats = view.querySelector(".stats");

  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const entry of state.history.slice(0, -1)) {
    if (!entry.error) messages.push({role: entry.role, content: entry.content});
  }
  const body = {model, messages, stream: true, stream_options: {include_usage: true},
                max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
                top_p: Number($("top-p").value)};

  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstAt = null, usage = null, provider = "";
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                           body: JSON.stringify(body), signal: state.controller.signal});
    if (!response.ok) {
      state.history.pop();
      if (response.status === 401) $("key-box").hidden = false;
      showError(await errorText(response));
      return;
    }
    provider = response.headers.get("x-tuneserve-provider") || "";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) throw new Error(data.error.message);
        if (data.usage) usage = data.usage;
        const delta = data.choices && data.choices[0] && data.choices[0].delta;
        if (delta && delta.content) {
          if (firstAt === null) firstAt = performance.now();
          reply.content += delta.content;
          content.innerHTML = renderMarkdown(reply.content);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
    reply.stats = describeUsage(usage, started, firstAt, provider);
  } catch (err) {
    if (err.name === "AbortError") {
      reply.stats = "stopped · " + describeUsage(usage, started, firstAt, provider);
    } else {
      reply.stats = describeUsage(usage, started, firstAt, provider);
      state.history.push({role: "assistant", content: `The answer broke off: ${err.message}`, error: true});
    }
  } finally {
    state.controller = null;
    setBusy(false);
    save();
    render();
  }
}

function describeUsage(usage, started, firstAt, provider) {
  const parts = [];
  if (provider) parts.push(`via ${provider}`);
  if (firstAt !== null) parts.push(`TTFT ${Math.round(firstAt - started)} ms`);
  if (usage) {
    parts.push(`${usage.prompt_tokens} + ${usage.completion_tokens} tokens`);
    if (usage.cost !== undefined) parts.push(`$${usage.cost.toFixed(6)}`);
    const decode = (performance.now() - (firstAt || started)) / 1000;
    if (firstAt !== null && decode > 0 && usage.completion_tokens > 1) {
      parts.push(`${(usage.completion_tokens / decode).toFixed(1)} tok/s`);
    }
  }
  return parts.join(" · ");
}

// -- wiring ----------------------------------------------------------------------------------------------

for (const id of ["max-tokens", "temperature", "top-p"]) {
  const show = () => { $(`${id}-value`).textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}
$("model").addEventListener("change", describeModel);
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => { state.history = []; save(); render(); });
$("change-key").addEventListener("click", () => { $("key-box").hidden = !$("key-box").hidden; });
$("save-key").addEventListener("click", () => {
  sessionStorage.setItem(API_KEY, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-box").hidden = true;
  loadModels();
});

render();
loadModels();
