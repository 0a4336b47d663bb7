// What the chat page and the dashboard share: the API key kept in the browser, authenticated
// fetches, OpenAI-shaped error messages, and the server-sent-event reader for streamed answers.

const KEY_STORAGE = "loraloop.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** An answer the API refused, with its HTTP status and the OpenAI error's message, code and param. */
export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }

  /** True when a key is missing or not good enough: the page should ask for one instead of failing. */
  get needsKey() {
    return this.status === 401 || this.status === 403;
  }
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  let param = null;
  try {
    const body = await response.json();
    const error = body.error ?? body;
    message = error.message ?? error.detail ?? message;
    code = error.code ?? null;
    param = error.param ?? null;
  } catch {
    // Not JSON (a proxy's error page, say): the status line is the best message there is.
  }
  return new ApiError(response.status, message, code, param);
}

/** fetch() with the stored key as a Bearer token; throws ApiError for any non-2xx answer. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "the server cannot be reached");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function apiJSON(path, options) {
  return (await api(path, options)).json();
}

/** The JSON payloads of an OpenAI-style SSE stream (`data: {...}` lines), up to `data: [DONE]`. */
export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // Events end with a blank line; a chunk from the network may hold several, or half of one.
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new ApiError(500, payload.error.message ?? "the stream failed", payload.error.code);
      yield payload;
    }
  }
}

/** Wires an API-key form: shows the stored key, saves (or clears) it, and calls back on change. */
export function bindKeyForm(form, onChange) {
  const input = form.querySelector("input");
  const note = form.querySelector("[data-key-note]");
  const show = () => {
    input.value = apiKey();
    if (note) note.textContent = apiKey() ? "A key is stored in this browser." : "No key: keyless local mode.";
  };
  show();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(input.value.trim());
    show();
    onChange();
  });
  form.querySelector("[data-key-clear]")?.addEventListener("click", () => {
    setApiKey("");
    show();
    onChange();
  });
}

/** Creates an element: el("button", {class: "x", "aria-label": "y", onclick: f}, "text", child…). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  // Text goes in as text nodes, never as HTML: answers and comments are untrusted.
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** 95 % Wilson score interval of up / (up + down), the same formula the server uses. */
export function wilson(up, down, z = 1.96) {
  const n = up + down;
  if (n === 0) return null;
  const p = up / n;
  const centre = (p + (z * z) / (2 * n)) / (1 + (z * z) / n);
  const half = (z * Math.sqrt((p * (1 - p)) / n + (z * z) / (4 * n * n))) / (1 + (z * z) / n);
  return [Math.max(0, centre - half), Math.min(1, centre + half)];
}

export function percent(x) {
  return x === null || x === undefined ? "–" : `${Math.round(x * 100)} %`;
}

/** A 95 % interval as "14–69 %". */
export function interval(low, high) {
  if (low === null || low === undefined) return "–";
  return `${Math.round(low * 100)}–${Math.round(high * 100)} %`;
}
