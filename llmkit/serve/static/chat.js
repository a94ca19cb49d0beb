// The chat page of `llmkit serve`: streams answers from /v1/chat/completions on this same origin.
// Everything the model or the user wrote is put on the page with textContent, never parsed as HTML,
// so an answer holding <script> or <img onerror> shows as text. The API key, if the server needs one,
// lives in the password field only: it is never stored, and never sent anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation so far, without the system prompt: [{role, content}]
let controller = null; // aborts the answer being streamed (the Stop button)
let modelId = null;

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function errorText(body, status) {
  const message = body && body.error && body.error.message;
  return typeof message === "string" ? message : "HTTP " + status;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: requestHeaders() });
    const body = await response.json();
    if (!response.ok) {
      $("model").textContent = errorText(body, response.status);
      return;
    }
    modelId = body.data[0].id;
    $("model").textContent = modelId;
  } catch (error) {
    $("model").textContent = "the server does not answer";
  }
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = "message " + role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  message.appendChild(content);
  $("messages").appendChild(message);
  message.scrollIntoView({ block: "end" });
  return message;
}

function numberFrom(id, parse) {
  const value = parse($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = busy ? "answering…" : "";
}

// Yields the parsed `data:` payloads of a server-sent-event stream, stopping at [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const content = bubble.querySelector(".content");
  const stats = document.createElement("span");
  stats.className = "stats";
  bubble.appendChild(stats);

  const system = $("system").value.trim();
  const body = {
    model: modelId || undefined,
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberFrom("temperature", parseFloat),
    top_p: numberFrom("top-p", parseFloat),
    top_k: numberFrom("top-k", (v) => parseInt(v, 10)),
    max_tokens: numberFrom("max-tokens", (v) => parseInt(v, 10)),
  };
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null, pieces = 0, usage = null, answer = "", stopped = false, failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: requestHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      let error = null;
      try { error = await response.json(); } catch (ignored) { /* not JSON: the status says enough */ }
      throw new Error(errorText(error, response.status));
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(errorText(chunk, 500));
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (typeof piece === "string" && piece) {
          if (first === null) first = performance.now();
          pieces += 1;
          answer += piece;
          content.textContent = answer;
        }
      }
      bubble.scrollIntoView({ block: "end" });
    }
  } catch (error) {
    if (error.name === "AbortError") {
      stopped = true;
    } else {
      failed = true;
      bubble.classList.add("error");
      content.textContent = (answer ? answer + "\n" : "") + "error: " + error.message;
    }
  }
  controller = null;
  if (answer) history.push({ role: "assistant", content: answer });
  else if (failed) history.pop(); // the question got no answer: it is not part of the conversation

  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : pieces; // without usage (stopped): pieces streamed
  const parts = [(usage ? "" : "≈") + tokens + " tokens"];
  if (first !== null && tokens > 1 && end > first) {
    parts.push(((tokens - 1) / ((end - first) / 1000)).toFixed(1) + " tokens/s");
  }
  if (first !== null) parts.push("first token after " + ((first - started) / 1000).toFixed(2) + " s");
  if (stopped) parts.push("stopped");
  stats.textContent = parts.join(", ");
  setBusy(false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("messages").replaceChildren();
  });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
});
