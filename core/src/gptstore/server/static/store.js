// gptstore storefront: what needs a script, and nothing else. Every page works without it.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

// Server-sent events from a fetch response: calls onEvent(type, data, id) for each event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const event = { type: "message", data: [], id: null };
      for (const line of block.split(/\r?\n/)) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event.type = text;
        else if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
      }
      if (event.data.length) onEvent(event.type, event.data.join("\n"), event.id);
    }
  }
}

// The chat playground: the answer streams in from /v1/chat/completions, token by token.
function chat(form) {
  const answer = document.getElementById("answer");
  const stats = document.getElementById("answer-stats");
  form.addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    answer.textContent = "";
    stats.textContent = "";
    const started = performance.now();
    let first = null;
    let chunks = 0;
    try {
      const response = await fetch(form.dataset.stream, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
        body: JSON.stringify({
          model: form.elements.model.value,
          messages: [{ role: "user", content: form.elements.message.value }],
          max_tokens: 128,
          stream: true,
        }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        answer.textContent = `Error ${response.status}: ${body.error?.message || response.statusText}`;
        return;
      }
      await readEvents(response, (_type, data) => {
        if (data === "[DONE]") return;
        const delta = JSON.parse(data).choices?.[0]?.delta?.content;
        if (delta) {
          if (first === null) first = performance.now() - started;
          chunks += 1;
          answer.textContent += delta;
          answer.dataset.chunks = String(chunks);
        }
      });
      const total = (performance.now() - started) / 1000;
      stats.textContent = `${chunks} chunks in ${total.toFixed(2)} s; first after ${((first || 0) / 1000).toFixed(2)} s`;
    } catch (error) {
      answer.textContent = `Error: ${error}`;
    } finally {
      button.disabled = false;
    }
  });
}

// A job's page: progress, messages and the end, as they happen.
async function followJob(box) {
  const bar = document.getElementById("job-progress");
  const message = document.getElementById("job-message");
  const list = document.getElementById("job-events");
  const state = document.getElementById("job-state");
  const response = await fetch(`/store/jobs/${box.dataset.job}/events`, {
    credentials: "same-origin",
    headers: { "Last-Event-ID": box.dataset.events || "0" },
  });
  if (!response.ok) return;
  await readEvents(response, (type, data) => {
    const event = JSON.parse(data);
    if (type === "progress") {
      bar.value = event.progress;
      bar.textContent = `${Math.round(event.progress * 100)}%`;
      message.textContent = event.message;
      const item = document.createElement("li");
      item.textContent = `${event.at.slice(11, 19)} ${String(Math.round(event.progress * 100)).padStart(3)}% ${event.message}`;
      list.append(item);
      list.scrollTop = list.scrollHeight;
    } else if (type === "end") {
      state.textContent = event.state;
      state.className = `state state-${event.state}`;
      window.location.reload();  // the result, the report and the loss chart as the server draws them
    }
  });
}

// Pages with live figures: parts marked data-live are fetched again every few seconds.
function refreshLive() {
  const live = document.querySelectorAll("[data-live]");
  if (!live.length) return;
  setInterval(async () => {
    // Marked as a refresh: it keeps no idle session alive (a person's next click does).
    const response = await fetch(window.location.href, {
      credentials: "same-origin",
      headers: { "X-Gptstore-Refresh": "1" },
    });
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const part of live) {
      const fresh = page.getElementById(part.id);
      if (fresh) part.innerHTML = fresh.innerHTML;
    }
  }, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("chat");
  if (form) chat(form);
  const job = document.getElementById("job");
  if (job && job.dataset.ended === "false") followJob(job);
  refreshLive();
});
