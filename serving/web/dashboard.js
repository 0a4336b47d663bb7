// The dashboard: per alias its versions (lineage, status, gate figures, producing run, live up-rate
// with its 95 % interval), a chart of the up-rate over time, the canary share, promote/rollback for
// admins, and the tuning runs. Everything comes from the admin API and refreshes every few seconds.

import { apiJSON, bindKeyForm, el, interval, percent } from "./api.js";
import { upRateChart } from "./chart.js";

const REFRESH_MS = 5000;
// Chart window (hours) → bucket size (seconds): about 60 buckets whatever the window.
const BUCKETS = { 1: 60, 6: 300, 24: 900, 168: 7200 };
const PALETTE = ["#2f5fd0", "#d0632f", "#1f9d6b", "#a23fc4", "#b8901c", "#2a9fbc", "#c43f6b", "#6b8e23"];
const BASE_COLOR = "#7a8597";
// Figures shown up front for a training phase; the rest sit behind "all figures".
const HEADLINE = ["passed", "steps", "train_loss", "last_loss", "seconds"];
const WINDOW_STORAGE = "loraloop.dashboard.window";
const MODE_STORAGE = "loraloop.dashboard.mode";

const $ = (id) => document.getElementById(id);
const ui = {
  content: $("content"),
  aliases: $("aliases"),
  runs: $("runs").tBodies[0],
  notice: $("notice"),
  actionStatus: $("action-status"),
  updated: $("updated"),
  autoRefresh: $("auto-refresh"),
  refreshNow: $("refresh-now"),
  window: $("window"),
  mode: $("mode"),
  dialog: $("confirm"),
  dialogText: $("confirm-text"),
  dialogOk: $("confirm-ok"),
};

const sections = new Map(); // alias name → its rendered section
const lastRendered = new WeakMap(); // node → the data it shows, so unchanged parts are not redrawn
let timer = null;
let refreshes = 0;

function colorOf(label) {
  const match = /@(\d+)$/.exec(label);
  return match ? PALETTE[(Number(match[1]) - 1) % PALETTE.length] : BASE_COLOR;
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function figure(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(3);
  if (typeof value === "boolean") return value ? "yes" : "no";
  return String(value);
}

/** Re-renders `node` only when `data` differs from what it shows: keeps focus and open menus across refreshes. */
function renderIfChanged(node, data, render) {
  const signature = JSON.stringify(data);
  if (lastRendered.get(node) === signature) return;
  lastRendered.set(node, signature);
  render();
}

function badge(status) {
  return el("span", { class: `badge ${status}` }, status);
}

function confirmAction(text, okText) {
  ui.dialogText.textContent = text;
  ui.dialogOk.textContent = okText;
  ui.dialog.returnValue = "";
  ui.dialog.showModal();
  return new Promise((resolve) => {
    ui.dialog.addEventListener("close", () => resolve(ui.dialog.returnValue === "ok"), { once: true });
  });
}

async function adminAction(path, body, done) {
  try {
    const result = await apiJSON(path, { method: "POST", body });
    ui.actionStatus.classList.remove("error");
    ui.actionStatus.textContent = done(result);
  } catch (error) {
    ui.actionStatus.classList.add("error");
    ui.actionStatus.textContent = error.needsKey
      ? "Promote and roll back need an admin API key: enter one under “API key”."
      : `Not done: ${error.message}`;
  }
  refresh();
}

async function promote(alias, version) {
  if (!(await confirmAction(`Make ${version.label} the active version of “${alias}”? New requests switch to it within seconds.`, `Promote ${version.label}`))) return;
  await adminAction(`/v1/admin/adapters/${encodeURIComponent(alias)}/promote`, { version: version.version }, (r) =>
    `${r.active} is now the active version of ${r.alias}.`,
  );
}

async function rollback(alias) {
  if (!(await confirmAction(`Roll “${alias}” back to what it served before?`, "Roll back"))) return;
  await adminAction(`/v1/admin/adapters/${encodeURIComponent(alias)}/rollback`, undefined, (r) =>
    `${r.alias} rolled back: it now answers with ${r.active ?? "the base model"}.`,
  );
}

function metricsList(metrics) {
  const groups = Object.entries(metrics ?? {});
  if (!groups.length) return el("span", { class: "muted" }, "–");
  // The gate's figures decide promotion, so they come first and in full; training phases show a headline.
  groups.sort(([a], [b]) => (a === "gate" ? -1 : b === "gate" ? 1 : a.localeCompare(b)));
  const headline = [];
  const rest = [];
  for (const [group, values] of groups) {
    if (values === null || typeof values !== "object") {
      headline.push([group, values]);
      continue;
    }
    for (let [key, value] of Object.entries(values)) {
      if (Array.isArray(value)) value = value.join("; ") || "none"; // the gate's reasons
      if (value !== null && typeof value === "object") continue;
      if (group === "gate" && (key === "passed" || key === "reasons")) continue; // shown as the verdict above
      (group === "gate" || HEADLINE.includes(key) ? headline : rest).push([`${group}.${key}`, value]);
    }
  }
  const item = ([key, value]) => el("li", {}, el("span", { class: "key" }, `${key} `), figure(value));
  const gate = metrics?.gate;
  const verdict =
    gate && typeof gate.passed === "boolean"
      ? el(
          "div",
          { class: "gate" },
          el("span", { class: `badge ${gate.passed ? "succeeded" : "rejected"}` }, gate.passed ? "gate passed" : "gate failed"),
          gate.reasons?.length ? el("div", { class: "small error" }, gate.reasons.join("; ")) : null,
        )
      : null;
  return el(
    "div",
    {},
    verdict,
    el("ul", { class: "metrics" }, headline.map(item)),
    rest.length ? el("details", {}, el("summary", { class: "small" }, "all figures"), el("ul", { class: "metrics" }, rest.map(item))) : null,
  );
}

function upRateCell(v) {
  if (!v.up && !v.down) return el("td", { class: "num muted" }, "no ratings yet");
  const low = v.up_rate_low ?? 0;
  const high = v.up_rate_high ?? 1;
  return el(
    "td",
    { class: "num" },
    `${percent(v.up_rate)} `,
    el("span", { class: "muted small" }, `(${interval(low, high)})`),
    el(
      "span",
      { class: "ci-bar", role: "img", "aria-label": `95 % interval ${percent(low)} to ${percent(high)}` },
      el("span", { class: "range", style: `left:${low * 100}%;width:${(high - low) * 100}%` }),
      el("span", { class: "point", style: `left:calc(${(v.up_rate ?? 0) * 100}% - 0.1rem)` }),
    ),
  );
}

function versionRow(alias, v) {
  const isBase = v.status === "base";
  const promoteButton =
    isBase || v.status === "active" || v.status === "failed"
      ? null
      : el("button", { type: "button", class: "ghost", "aria-label": `Promote ${v.label}` }, "Promote");
  promoteButton?.addEventListener("click", () => promote(alias.name, v));
  const servingHere = alias.serving === v.label;
  return el(
    "tr",
    { class: v.status === "active" ? "is-active" : null, dataset: { label: v.label, status: v.status } },
    el(
      "th",
      { scope: "row", class: "mono" },
      v.label,
      servingHere ? el("div", { class: "muted small" }, "serving here") : null,
    ),
    el(
      "td",
      { class: "status-cell" },
      badge(v.status),
      v.status_reason ? el("div", { class: "muted small" }, v.status_reason) : null,
    ),
    el("td", { class: "mono" }, isBase ? "–" : v.parent ?? alias.base?.label ?? "base"),
    el("td", {}, v.tuning_run_id ? el("a", { href: `#run-${v.tuning_run_id}` }, `run #${v.tuning_run_id}`) : "–"),
    el("td", { class: "num" }, isBase ? "–" : when(v.created_at)),
    el("td", { class: "num" }, when(v.promoted_at)),
    el("td", { class: "num" }, `${v.up} up · ${v.down} down`),
    upRateCell(v),
    el("td", {}, isBase ? el("span", { class: "muted" }, "the model without an adapter") : metricsList(v.metrics)),
    el("td", {}, promoteButton),
  );
}

function lineage(alias) {
  // From the base through each parent to the active version: what the current adapter was trained from.
  const byLabel = new Map(alias.versions.map((v) => [v.label, v]));
  const chain = [];
  for (let label = alias.active; label && byLabel.has(label) && chain.length < 50; label = byLabel.get(label).parent) {
    chain.unshift(label);
  }
  const parts = [alias.base?.label ?? "base", ...chain];
  return parts.flatMap((label, i) => [
    ...(i ? [el("span", { class: "arrow", "aria-hidden": "true" }, "→")] : []),
    el("span", { class: `badge ${i === parts.length - 1 ? "active" : "retired"} mono` }, label),
  ]);
}

function aliasSection(name) {
  if (sections.has(name)) return sections.get(name);
  const titleId = `alias-${name}-title`;
  const section = {
    facts: el("dl", { class: "facts" }),
    lineage: el("p", { class: "lineage", "aria-label": "Lineage of the active version" }),
    versions: el("tbody"),
    chart: el("figure", { class: "chart", "data-alias": name }),
    legend: el("ul", { class: "legend", "aria-label": "Versions in the chart" }),
    rollback: el("button", { type: "button", class: "ghost", "aria-label": `Roll back ${name}` }, "Roll back"),
    events: el("div", { class: "events", hidden: true }),
  };
  section.rollback.addEventListener("click", () => rollback(name));
  section.node = el(
    "section",
    { class: "card alias", "aria-labelledby": titleId, dataset: { alias: name } },
    el("div", { class: "card-head" }, el("h2", { id: titleId }, `Alias “${name}”`), section.rollback),
    section.facts,
    section.lineage,
    el("h3", {}, "Versions"),
    el(
      "table",
      { class: "versions", "aria-label": `Versions of ${name}` },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["Version", "Status", "Parent", "Created by", "Created", "Promoted", "Ratings", "Up-rate (95 % interval)", "Gate and training figures", ""].map(
            (text) => el("th", { scope: "col" }, text),
          ),
        ),
      ),
      section.versions,
    ),
    el("h3", {}, "Live up-rate per version"),
    el("div", { class: "chart-wrap" }, section.chart, section.legend),
    section.events,
  );
  sections.set(name, section);
  ui.aliases.append(section.node);
  return section;
}

function renderAlias(alias, points, events, windowHours) {
  const section = aliasSection(alias.name);
  const facts = [alias.active, alias.serving, alias.canary, alias.canary_share, alias.canary_started_at, alias.pinned];
  renderIfChanged(section.facts, [facts, alias.versions.map((v) => [v.label, v.parent])], () => {
    const fact = (term, value) => el("div", {}, el("dt", {}, term), el("dd", { class: "mono" }, value));
    section.facts.replaceChildren(
      fact("Active version", alias.active ?? `none (base model)`),
      fact("Serving on this server", alias.serving ?? "–"),
      fact(
        "Canary",
        alias.canary
          ? `${alias.canary} · ${percent(alias.canary_share)} of requests${alias.canary_started_at ? ` since ${when(alias.canary_started_at)}` : ""}`
          : "none",
      ),
      fact("Base model", alias.base?.label ?? "–"),
      alias.pinned === undefined ? null : fact("Pinned", alias.pinned ? "yes: rounds and canaries leave it alone" : "no"),
    );
    section.lineage.replaceChildren(el("span", { class: "muted" }, "Lineage:"), ...lineage(alias));
    section.rollback.disabled = !alias.active;
  });

  const rows = [...alias.versions].sort((a, b) => b.version - a.version);
  if (alias.base) rows.push(alias.base);
  renderIfChanged(section.versions, rows, () => {
    section.versions.replaceChildren(...rows.map((v) => versionRow(alias, v)));
  });

  // The chart's time axis moves with the clock, so it is redrawn on every refresh.
  const bucketMs = BUCKETS[windowHours] * 1000;
  const to = Date.now();
  // The axis starts a bucket before the first rating when that is later than the window's start: a loop
  // that began ten minutes ago should fill the chart, not sit in its right-hand corner.
  const windowStart = to - windowHours * 3600 * 1000;
  const first = Math.min(...points.map((p) => Date.parse(p.bucket_start)));
  const from = points.length ? Math.max(windowStart, Math.min(first - bucketMs, to - 5 * bucketMs)) : windowStart;
  const byLabel = new Map();
  for (const p of points) {
    if (!byLabel.has(p.label)) byLabel.set(p.label, []);
    byLabel.get(p.label).push({ at: Date.parse(p.bucket_start), up: p.up, down: p.down });
  }
  const order = [alias.base?.label, ...[...alias.versions].sort((a, b) => a.version - b.version).map((v) => v.label)];
  const labels = [...new Set([...order.filter((l) => l && byLabel.has(l)), ...byLabel.keys()])];
  const series = labels.map((label) => ({ label, color: colorOf(label), buckets: byLabel.get(label) }));
  const markers = alias.versions
    .filter((v) => v.promoted_at)
    .map((v) => ({ at: Date.parse(v.promoted_at), label: `@${v.version} promoted` }));
  const windowText = ui.window.selectedOptions[0]?.textContent ?? "";
  section.chart.replaceChildren(
    upRateChart(series, {
      from,
      to,
      bucketMs,
      mode: ui.mode.value,
      markers,
      title: `Up-rate of ${alias.name} per version, ${windowText.toLowerCase()}, ${ui.mode.value === "cumulative" ? "cumulative" : "per bucket"}, with 95 % intervals`,
    }),
    el("figcaption", { class: "muted small" }, "Shaded: 95 % Wilson interval. Hover a dot for its counts. Dashed: a promotion."),
  );

  renderIfChanged(section.events, events, () => renderEvents(section.events, events));

  const tallies = [alias.base, ...alias.versions].filter((v) => v && (v.up || v.down || byLabel.has(v.label)));
  renderIfChanged(section.legend, tallies, () => {
    section.legend.replaceChildren(
      ...(tallies.length ? tallies : []).map((v) =>
        el(
          "li",
          { dataset: { label: v.label } },
          el("span", { class: "swatch", style: `background:${colorOf(v.label)}`, "aria-hidden": "true" }),
          el("span", { class: "mono" }, v.label, " ", badge(v.status)),
          el(
            "span",
            { class: "figures" },
            v.up || v.down
              ? `${v.up} up · ${v.down} down · ${percent(v.up_rate)} (95 % interval ${interval(v.up_rate_low, v.up_rate_high)}), all time`
              : "no ratings yet",
          ),
        ),
      ),
    );
    if (!tallies.length) section.legend.append(el("li", { class: "muted" }, "No ratings yet."));
  });
}

/** The registry's decisions (promotions, rollbacks, canary verdicts…) with their reasons, when the server keeps them. */
function renderEvents(container, events) {
  container.hidden = !events;
  if (!events) return;
  container.replaceChildren(
    el("h3", {}, "Recent decisions"),
    events.length
      ? el(
          "table",
          { class: "events-table", "aria-label": "Recent registry decisions" },
          el("thead", {}, el("tr", {}, ["When", "Action", "Version", "By", "Why"].map((t) => el("th", { scope: "col" }, t)))),
          el(
            "tbody",
            {},
            events.map((e) =>
              el(
                "tr",
                {},
                el("td", { class: "num" }, when(e.created_at)),
                el("td", {}, e.action.replaceAll("_", " ")),
                el("td", { class: "mono" }, e.version ?? "–"),
                el("td", {}, e.actor),
                el("td", { class: "small" }, e.reason),
              ),
            ),
          ),
        )
      : el("p", { class: "muted" }, "No decisions yet."),
  );
}

function renderRuns(runs, labels) {
  const now = Date.now();
  ui.runs.replaceChildren(
    ...runs.map((run) => {
      const seconds = run.seconds ?? (run.status === "running" ? (now - Date.parse(run.created_at)) / 1000 : null);
      const counts = Object.entries(run.data_counts ?? {})
        .filter(([, n]) => typeof n === "number")
        .map(([key, n]) => `${key.replaceAll("_", " ")} ${n}`)
        .join(" · ");
      return el(
        "tr",
        { id: `run-${run.id}`, dataset: { status: run.status } },
        el("th", { scope: "row" }, `#${run.id}`),
        el("td", { class: "mono" }, run.adapter_name),
        el("td", {}, run.trigger),
        el("td", {}, run.method ?? "–"),
        el(
          "td",
          {},
          badge(run.status),
          run.error ? el("div", { class: "muted small", title: run.error }, run.error.split("\n")[0].slice(0, 120)) : null,
        ),
        el(
          "td",
          {},
          el("progress", { max: 1, value: run.progress, "aria-label": `Run ${run.id} progress` }),
          el("div", { class: "muted small" }, `${run.stage} · ${percent(run.progress)}`),
        ),
        el("td", { class: "num" }, duration(seconds), run.status === "running" ? el("div", { class: "muted small" }, "so far") : null),
        el("td", { class: "small" }, counts || "–"),
        el("td", { class: "mono" }, run.produced_version_id ? labels.get(run.produced_version_id) ?? `#${run.produced_version_id}` : "–"),
        el("td", { class: "num" }, when(run.created_at)),
      );
    }),
  );
  if (!runs.length) ui.runs.append(el("tr", {}, el("td", { colspan: 10, class: "muted" }, "No tuning runs yet.")));
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

async function refresh() {
  clearTimeout(timer);
  const windowHours = Number(ui.window.value);
  try {
    const [aliases, runs] = await Promise.all([apiJSON("/v1/admin/adapters"), apiJSON("/v1/admin/runs?limit=25")]);
    const query = (name) =>
      `/v1/admin/stats/uprate?alias=${encodeURIComponent(name)}&bucket_seconds=${BUCKETS[windowHours]}&hours=${windowHours}`;
    const series = await Promise.all(aliases.map((alias) => apiJSON(query(alias.name))));
    // The decision log is newer than the rest of the admin API: a server without it just shows no log.
    const events = await Promise.all(
      aliases.map((alias) =>
        apiJSON(`/v1/admin/adapters/${encodeURIComponent(alias.name)}/events?limit=8`).catch(() => null),
      ),
    );
    ui.notice.hidden = true;
    ui.content.hidden = false;
    aliases.forEach((alias, i) => renderAlias(alias, series[i], events[i], windowHours));
    const labels = new Map(aliases.flatMap((alias) => alias.versions.map((v) => [v.id, v.label])));
    renderRuns(runs, labels);
    refreshes += 1;
    document.body.dataset.refreshes = String(refreshes);
    ui.updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (error.status === 401) {
      ui.content.hidden = true;
      showNotice("The dashboard needs an admin API key. Enter one under “API key” above.");
    } else if (error.status === 403) {
      ui.content.hidden = true;
      showNotice("This API key is not an admin key. The dashboard needs an admin key: enter one under “API key” above.");
    } else {
      // Keep showing the last good figures, marked as stale.
      showNotice(`Could not refresh (${error.message}); the figures below may be out of date.`);
    }
    document.body.dataset.authProblem = String(error.needsKey ?? false);
  } finally {
    if (ui.autoRefresh.checked) timer = setTimeout(refresh, REFRESH_MS);
  }
}

ui.window.value = localStorage.getItem(WINDOW_STORAGE) ?? ui.window.value;
ui.mode.value = localStorage.getItem(MODE_STORAGE) ?? ui.mode.value;
ui.window.addEventListener("change", () => {
  localStorage.setItem(WINDOW_STORAGE, ui.window.value);
  refresh();
});
ui.mode.addEventListener("change", () => {
  localStorage.setItem(MODE_STORAGE, ui.mode.value);
  refresh();
});
ui.autoRefresh.addEventListener("change", refresh);
ui.refreshNow.addEventListener("click", refresh);
bindKeyForm($("key-form"), refresh);
refresh();
