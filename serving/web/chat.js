// The chat page: a conversation with streamed answers, thumbs with reasons on every answer, and
// "regenerate" that puts a second answer beside the first so the user can pick the better one.
// Every rating and pick goes to the feedback API at once; the tuning loop trains on them.

import { ApiError, api, apiJSON, bindKeyForm, el, sseData } from "./api.js";

// Open WebUI's reason chips (RateComment.svelte), stored under the same snake_case keys.
const REASONS = {
  up: [
    ["accurate_information", "Accurate information"],
    ["followed_instructions_perfectly", "Followed instructions perfectly"],
    ["showcased_creativity", "Showcased creativity"],
    ["positive_attitude", "Positive attitude"],
    ["attention_to_detail", "Attention to detail"],
    ["thorough_explanation", "Thorough explanation"],
    ["other", "Other"],
  ],
  down: [
    ["dont_like_the_style", "Don't like the style"],
    ["too_verbose", "Too verbose"],
    ["not_helpful", "Not helpful"],
    ["not_factually_correct", "Not factually correct"],
    ["didnt_fully_follow_instructions", "Didn't fully follow instructions"],
    ["refused_when_it_shouldnt_have", "Refused when it shouldn't have"],
    ["being_lazy", "Being lazy"],
    ["other", "Other"],
  ],
};

const OUTCOMES = [
  ["a", "A is better"],
  ["b", "B is better"],
  ["tie", "It's a tie"],
  ["both_bad", "Both are bad"],
];

const MODEL_STORAGE = "loraloop.model";
const MAX_TOKENS_STORAGE = "loraloop.maxTokens";
const TEMPERATURE_STORAGE = "loraloop.regenTemperature";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"),
  empty: $("empty-state"),
  status: $("status"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  model: $("model"),
  modelNote: $("model-note"),
  maxTokens: $("max-tokens"),
  temperature: $("regen-temperature"),
  newChat: $("new-chat"),
};

const turns = [];
let generating = null; // the AbortController of the answer being generated, if any
let nextId = 0;

function uid(prefix) {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

// Drawn, not an emoji: machines without an emoji font would show empty boxes. Thumbs-down is the same
// drawing turned over by CSS.
function thumbIcon() {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute(
    "d",
    "M7 10v11H4a1 1 0 0 1-1-1v-9a1 1 0 0 1 1-1h3zm0 0 4-8a3 3 0 0 1 3 3v4h5.5a2 2 0 0 1 2 2.3l-1.3 8A2 2 0 0 1 18.2 21H7",
  );
  svg.append(path);
  return svg;
}

function say(text) {
  ui.status.textContent = text;
}

function describe(error) {
  if (error instanceof ApiError && error.status === 401) return "this server needs an API key: enter one under Settings";
  if (error instanceof ApiError && error.status === 403) return `your API key may not do this (${error.message})`;
  return error.message || String(error);
}

function keepScrolledDown() {
  const list = ui.messages;
  // Follow the stream only when the reader is already at the bottom; don't yank them back while they scroll up.
  if (list.scrollHeight - list.scrollTop - list.clientHeight < 120) list.scrollTop = list.scrollHeight;
}

function chosenModel() {
  // The picker is empty when /v1/models failed (no key yet, say): `default` always exists.
  return ui.model.value || "default";
}

function samplingOptions(extra = {}) {
  const options = { ...extra };
  const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) options.max_tokens = maxTokens;
  return options;
}

/** One answer in the conversation: its streamed text, the version that wrote it, and the user's rating of it. */
class Answer {
  constructor(turn, label = null) {
    this.turn = turn;
    this.id = null;
    this.content = "";
    this.rating = 0;
    this.reasons = new Set();
    this.chunks = 0;
    this.saving = Promise.resolve();

    this.labelNode = el("span", { class: "answer-label" }, label ? `Answer ${label}` : "");
    this.text = el("div", { class: "answer-text" });
    this.version = el("span", { class: "version", title: "The adapter version that wrote this answer" }, "…");
    this.up = el(
      "button",
      { type: "button", class: "thumb up", "aria-label": "Good answer", "aria-pressed": "false", disabled: true },
      thumbIcon(),
    );
    this.down = el(
      "button",
      { type: "button", class: "thumb down", "aria-label": "Bad answer", "aria-pressed": "false", disabled: true },
      thumbIcon(),
    );
    this.up.addEventListener("click", () => this.rate(1));
    this.down.addEventListener("click", () => this.rate(-1));
    this.regenerate = el(
      "button",
      { type: "button", class: "ghost regenerate", disabled: true, hidden: label !== null },
      "Regenerate",
    );
    this.regenerate.addEventListener("click", () => regenerate(turn));
    this.note = el("span", { class: "feedback-note small", role: "status" });
    this.panel = this.buildPanel();
    this.node = el(
      "article",
      // aria-busy while streaming: screen readers read the finished answer once, not every token as it lands.
      {
        class: "answer",
        "aria-label": label ? `Answer ${label}` : "Answer",
        "aria-busy": "true",
        dataset: { state: "streaming" },
      },
      el("header", { class: "answer-head" }, this.labelNode, el("span", { class: "answered-by" }, "answered by ", this.version)),
      this.text,
      el("div", { class: "answer-actions" }, this.up, this.down, this.regenerate, this.note),
      this.panel,
    );
  }

  buildPanel() {
    this.panelTitle = el("p", { class: "panel-title" });
    this.chips = el("div", { class: "chips", role: "group", "aria-label": "Reasons" });
    this.comment = el("textarea", { id: uid("comment"), rows: 2, maxlength: 4000 });
    this.correction = el("textarea", { id: uid("correction"), rows: 3, maxlength: 32000 });
    this.correctionField = el(
      "div",
      { class: "field" },
      el("label", { for: this.correction.id }, "A better answer (optional)"),
      this.correction,
      el("p", { class: "muted small" }, "Trained on as the answer that should have been given."),
    );
    const retract = el("button", { type: "button", class: "ghost" }, "Retract rating");
    retract.addEventListener("click", () => this.retract());
    const close = el("button", { type: "button", class: "ghost" }, "Close");
    close.addEventListener("click", () => {
      this.panel.hidden = true;
    });
    const panel = el(
      "form",
      { class: "feedback-panel", hidden: true, "aria-label": "Feedback on this answer" },
      this.panelTitle,
      this.chips,
      el(
        "div",
        { class: "field" },
        el("label", { for: this.comment.id }, "Comment (optional)"),
        this.comment,
      ),
      this.correctionField,
      el("div", { class: "row" }, el("button", { type: "submit" }, "Save feedback"), retract, close),
    );
    panel.addEventListener("submit", (event) => {
      event.preventDefault();
      this.save("Feedback saved");
    });
    return panel;
  }

  setLabel(label) {
    this.labelNode.textContent = `Answer ${label}`;
    this.node.setAttribute("aria-label", `Answer ${label}`);
  }

  setVersion(label) {
    if (!label) return;
    this.version.textContent = label;
    this.node.dataset.version = label;
    this.version.classList.toggle("base", !label.includes("@"));
  }

  /** Streams an answer to `messages` from `model` into this card. */
  async generate(messages, model, options, signal) {
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        body: { model, messages, stream: true, ...options },
        signal,
      });
      this.setVersion(response.headers.get("x-loraloop-adapter-version"));
      for await (const chunk of sseData(response)) {
        this.id ??= chunk.id;
        this.setVersion(chunk.system_fingerprint);
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) {
          this.content += choice.delta.content;
          this.text.textContent = this.content;
          this.chunks += 1;
          this.node.dataset.chunks = String(this.chunks);
          keepScrolledDown();
        }
        if (choice?.finish_reason === "length") {
          this.text.after(el("p", { class: "muted small" }, "Cut off at the token limit."));
        }
      }
      this.finish("done");
    } catch (error) {
      if (error.name === "AbortError") {
        // The server records what was shown before the stop, so a stopped answer can still be rated.
        this.finish("stopped");
        this.text.after(el("p", { class: "muted small" }, "Stopped."));
      } else {
        this.finish("error");
        this.text.after(el("p", { class: "error", role: "alert" }, `No answer: ${describe(error)}`));
      }
    }
  }

  finish(state) {
    this.node.dataset.state = state;
    this.node.removeAttribute("aria-busy");
    if (!this.content && state === "done") this.text.append(el("em", { class: "muted" }, "(an empty answer)"));
    if (this.id) {
      this.node.dataset.completionId = this.id;
      this.up.disabled = false;
      this.down.disabled = false;
    }
  }

  /** A thumb: saved at once (one click is enough), then the panel offers reasons, a comment and a correction. */
  rate(value) {
    if (!this.id) return;
    if (this.rating === value) {
      this.retract(); // pressing the lit thumb again takes the rating back
      return;
    }
    this.rating = value;
    this.reasons.clear();
    this.renderRating();
    this.panel.hidden = false;
    this.save("Rating saved");
  }

  retract() {
    if (this.rating === 0) return;
    this.rating = 0;
    this.reasons.clear();
    this.renderRating();
    this.panel.hidden = true;
    this.save("Rating retracted");
  }

  renderRating() {
    this.up.setAttribute("aria-pressed", String(this.rating === 1));
    this.down.setAttribute("aria-pressed", String(this.rating === -1));
    if (this.rating === 0) return;
    const positive = this.rating === 1;
    this.panelTitle.textContent = positive ? "What was good about it?" : "What was wrong with it?";
    this.comment.placeholder = "Feel free to add specific details";
    this.correction.placeholder = "What should it have said?";
    this.correctionField.hidden = positive;
    this.chips.replaceChildren(
      ...REASONS[positive ? "up" : "down"].map(([key, text]) => {
        const chip = el("button", { type: "button", class: "chip", "aria-pressed": "false", dataset: { reason: key } }, text);
        chip.addEventListener("click", () => {
          if (this.reasons.has(key)) this.reasons.delete(key);
          else this.reasons.add(key);
          chip.setAttribute("aria-pressed", String(this.reasons.has(key)));
        });
        return chip;
      }),
    );
  }

  /** Posts the current rating; posts are queued so a quick thumb-then-save lands in the order clicked. */
  save(done) {
    const body = { completion_id: this.id, rating: this.rating };
    if (this.rating !== 0) {
      body.reasons = [...this.reasons];
      const comment = this.comment.value.trim();
      if (comment) body.comment = comment;
      const correction = this.correction.value.trim();
      if (this.rating < 0 && correction) body.correction = correction;
    }
    this.note.textContent = "Saving…";
    this.saving = this.saving.then(async () => {
      try {
        const saved = await apiJSON("/v1/feedback", { method: "POST", body });
        this.node.dataset.feedback = saved.status;
        this.node.dataset.feedbackRevision = String(saved.revision);
        this.note.classList.remove("error");
        this.note.textContent = done;
        say(`${done}.`);
      } catch (error) {
        this.note.classList.add("error");
        this.note.textContent = `Not saved: ${describe(error)}`;
      }
    });
  }
}

function history() {
  // The conversation so far as the model sees it: each turn's question and its chosen (or only) answer.
  return turns.flatMap((turn) => {
    const answer = turn.chosen ?? turn.answers[0];
    if (!answer?.content) return [];
    return [
      { role: "user", content: turn.text },
      { role: "assistant", content: answer.content },
    ];
  });
}

async function whileGenerating(work) {
  const controller = new AbortController();
  generating = controller;
  ui.send.disabled = true;
  ui.stop.hidden = false;
  try {
    await work(controller.signal);
  } finally {
    generating = null;
    ui.send.disabled = false;
    ui.stop.hidden = true;
  }
}

async function ask(text) {
  ui.empty.hidden = true;
  for (const turn of turns) turn.answers[0].regenerate.hidden = true; // only the last answer can be regenerated
  const turn = { text, messages: [...history(), { role: "user", content: text }], answers: [], chosen: null };
  const answer = new Answer(turn);
  turn.answers.push(answer);
  turn.answersNode = el("div", { class: "answers" }, answer.node);
  turn.node = el(
    "li",
    { class: "turn" },
    el("div", { class: "user-message" }, el("span", { class: "visually-hidden" }, "You said: "), text),
    turn.answersNode,
  );
  turns.push(turn);
  ui.messages.append(turn.node);
  keepScrolledDown();
  await whileGenerating((signal) => answer.generate(turn.messages, chosenModel(), samplingOptions(), signal));
  answer.regenerate.disabled = !answer.id;
}

/** A second answer to the same messages beside the first; the user's pick is stored as a comparison. */
async function regenerate(turn) {
  if (generating || turn.answers.length > 1) return;
  const [first] = turn.answers;
  first.regenerate.hidden = true;
  first.setLabel("A");
  const second = new Answer(turn, "B");
  turn.answers.push(second);
  turn.answersNode.classList.add("side-by-side");
  turn.answersNode.append(second.node);

  const buttons = OUTCOMES.map(([outcome, text]) => {
    const button = el("button", { type: "button", "aria-pressed": "false", disabled: true, dataset: { outcome } }, text);
    button.addEventListener("click", () => choose(turn, outcome, buttons));
    return button;
  });
  turn.choiceNote = el("span", { class: "feedback-note small", role: "status" });
  turn.node.append(
    el(
      "div",
      { class: "choice", role: "group", "aria-label": "Which answer is better?" },
      el("span", { class: "choice-question" }, "Which answer is better?"),
      ...buttons,
      turn.choiceNote,
    ),
  );
  // Greedy decoding would repeat the first answer word for word: the second one is sampled.
  const temperature = Number.parseFloat(ui.temperature.value);
  const options = samplingOptions(Number.isFinite(temperature) ? { temperature } : {});
  await whileGenerating((signal) => second.generate(turn.messages, chosenModel(), options, signal));
  const ready = first.id && second.id;
  for (const button of buttons) button.disabled = !ready;
  if (!ready) turn.choiceNote.textContent = "Both answers are needed to compare.";
}

async function choose(turn, outcome, buttons) {
  const [a, b] = turn.answers;
  for (const button of buttons) button.disabled = true;
  turn.choiceNote.textContent = "Saving…";
  try {
    await apiJSON("/v1/comparisons", { method: "POST", body: { a: a.id, b: b.id, outcome } });
  } catch (error) {
    turn.choiceNote.classList.add("error");
    turn.choiceNote.textContent = `Not saved: ${describe(error)}`;
    for (const button of buttons) button.disabled = false;
    return;
  }
  for (const button of buttons) button.setAttribute("aria-pressed", String(button.dataset.outcome === outcome));
  turn.node.dataset.comparison = outcome;
  // The conversation goes on from the preferred answer (from A when neither won).
  turn.chosen = outcome === "b" ? b : a;
  for (const answer of turn.answers) answer.node.classList.toggle("chosen", answer === turn.chosen && outcome !== "tie" && outcome !== "both_bad");
  turn.choiceNote.classList.remove("error");
  turn.choiceNote.textContent = "Comparison saved";
  say("Comparison saved.");
}

async function loadModels() {
  let models;
  try {
    models = (await apiJSON("/v1/models")).data;
  } catch (error) {
    ui.modelNote.textContent = `Models unavailable: ${describe(error)}`;
    return;
  }
  ui.modelNote.textContent = "";
  const wanted = ui.model.value || localStorage.getItem(MODEL_STORAGE) || "default";
  const groups = { Aliases: [], "Base model": [], Versions: [] };
  for (const model of models) {
    if (model.status === "alias") groups.Aliases.push([model.id, `${model.id} (now ${model.root})`]);
    else if (!model.status || model.status === "base") groups["Base model"].push([model.id, model.id]);
    else groups.Versions.push([model.id, `${model.id} · ${model.status}`]);
  }
  ui.model.replaceChildren(
    ...Object.entries(groups)
      .filter(([, options]) => options.length)
      .map(([name, options]) =>
        el("optgroup", { label: name }, ...options.map(([value, text]) => el("option", { value }, text))),
      ),
  );
  if (models.some((model) => model.id === wanted)) ui.model.value = wanted;
  ui.model.dataset.loaded = "true";
}

function newChat() {
  generating?.abort();
  turns.length = 0;
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  say("");
  ui.prompt.focus();
}

function persist(input, key) {
  input.value = localStorage.getItem(key) ?? input.value;
  input.addEventListener("change", () => localStorage.setItem(key, input.value));
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || generating) return;
  ui.prompt.value = "";
  ask(text).finally(() => ui.prompt.focus());
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => generating?.abort());
ui.newChat.addEventListener("click", newChat);
ui.model.addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, ui.model.value));
persist(ui.maxTokens, MAX_TOKENS_STORAGE);
persist(ui.temperature, TEMPERATURE_STORAGE);
bindKeyForm($("key-form"), loadModels);
loadModels();
