// The dashboard's up-rate chart, drawn as SVG by hand (no chart library: nothing to fetch, no build).
// One line per adapter version, the 95 % Wilson interval as a shaded band around it, a dot per time
// bucket whose tooltip gives the counts, and a dashed marker where a version was promoted.

import { interval, percent, wilson } from "./api.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 760;
const HEIGHT = 300;
const MARGIN = { left: 48, right: 34, top: 18, bottom: 30 };

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function clockTime(ms, span) {
  const options = { hour: "2-digit", minute: "2-digit" };
  if (span > 24 * 3600 * 1000) options.weekday = "short";
  if (span < 15 * 60 * 1000) options.second = "2-digit"; // ticks a minute or less apart
  return new Date(ms).toLocaleString([], options);
}

const TICK_STEPS = [10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400].map((s) => s * 1000);

/** Round times (every 5 min, every hour…) between `from` and `to`, at most 7 of them. */
function timeTicks(from, to) {
  const step = TICK_STEPS.find((candidate) => (to - from) / candidate <= 7) ?? TICK_STEPS.at(-1);
  // Steps of an hour or more fall on the local clock's hours, not on UTC's.
  const offset = step >= 3600 * 1000 ? new Date(from).getTimezoneOffset() * 60 * 1000 : 0;
  const ticks = [];
  for (let at = Math.ceil((from - offset) / step) * step + offset; at <= to; at += step) ticks.push(at);
  return ticks;
}

/**
 * Rate points of one version. `buckets` are [{at (ms, bucket start), up, down}] sorted by time; in
 * "cumulative" mode each point counts every rating since the window's start, in "bucket" mode only its own.
 */
export function ratePoints(buckets, mode, bucketMs) {
  let up = 0;
  let down = 0;
  return buckets.map((bucket) => {
    up = mode === "cumulative" ? up + bucket.up : bucket.up;
    down = mode === "cumulative" ? down + bucket.down : bucket.down;
    const [low, high] = wilson(up, down);
    // Plotted at the bucket's end: "as of then". The x scale clamps the current bucket's end to now.
    return { at: bucket.at + bucketMs, up, down, rate: up / (up + down), low, high };
  });
}

/**
 * series: [{label, color, buckets}]; window: {from, to, bucketMs} in ms; markers: [{at, label}].
 * Returns the <svg>; every series is a <g class="series" data-label=…> so it can be found and tested.
 */
export function upRateChart(series, { from, to, bucketMs, mode, markers = [], title }) {
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const x = (ms) => MARGIN.left + (Math.min(Math.max(ms, from), to) - from) / (to - from) * plotWidth;
  const y = (rate) => MARGIN.top + (1 - rate) * plotHeight;
  const span = to - from;

  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": title });
  root.append(svg("title", {}, title));

  const axes = svg("g", { class: "axes" });
  for (const rate of [0, 0.25, 0.5, 0.75, 1]) {
    axes.append(svg("line", { class: "grid", x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(rate), y2: y(rate) }));
    axes.append(
      svg("text", { class: "axis-label", x: MARGIN.left - 8, y: y(rate) + 4, "text-anchor": "end" }, percent(rate)),
    );
  }
  for (const at of timeTicks(from, to)) {
    axes.append(svg("line", { class: "grid", x1: x(at), x2: x(at), y1: MARGIN.top + plotHeight, y2: MARGIN.top + plotHeight + 4 }));
    axes.append(svg("text", { class: "axis-label", x: x(at), y: HEIGHT - 8, "text-anchor": "middle" }, clockTime(at, span)));
  }
  root.append(axes);

  const shown = markers.filter((marker) => marker.at >= from && marker.at <= to);
  for (const [i, marker] of shown.entries()) {
    root.append(
      svg(
        "g",
        { class: "marker-group" },
        svg("line", { class: "marker", x1: x(marker.at), x2: x(marker.at), y1: MARGIN.top, y2: MARGIN.top + plotHeight }),
        // Labels step down so that promotions close together stay readable.
        // Near the right edge the label goes on the line's left, inside the picture.
        svg(
          "text",
          {
            class: "marker-label",
            x: x(marker.at) > WIDTH - 90 ? x(marker.at) - 3 : x(marker.at) + 3,
            y: MARGIN.top + 9 + 11 * (i % 4),
            "text-anchor": x(marker.at) > WIDTH - 90 ? "end" : "start",
          },
          marker.label,
        ),
      ),
    );
  }

  const plotted = series.filter(({ buckets }) => buckets.length);
  for (const [i, { label, color, buckets }] of plotted.entries()) {
    // Versions rated in the same bucket would hide each other's dots: each is nudged a few pixels sideways.
    const dodge = (i - (plotted.length - 1) / 2) * 5;
    const px = (ms) => x(ms) + dodge;
    const points = ratePoints(buckets, mode, bucketMs);
    const group = svg("g", { class: "series", "data-label": label });
    if (points.length > 1) {
      const upper = points.map((p) => `${px(p.at)},${y(p.high)}`);
      const lower = points.map((p) => `${px(p.at)},${y(p.low)}`).reverse();
      group.append(svg("polygon", { class: "band", points: [...upper, ...lower].join(" "), fill: color, "fill-opacity": 0.14 }));
      group.append(
        svg("polyline", {
          class: "line",
          points: points.map((p) => `${px(p.at)},${y(p.rate)}`).join(" "),
          fill: "none",
          stroke: color,
          "stroke-width": 2,
        }),
      );
    }
    for (const p of points) {
      // A lone point has no band to show its interval: draw it as an error bar instead.
      if (points.length === 1) {
        group.append(
          svg("line", { class: "whisker", x1: px(p.at), x2: px(p.at), y1: y(p.low), y2: y(p.high), stroke: color, "stroke-width": 2 }),
        );
      }
      const tip = `${label}, ${clockTime(p.at, span)}: ${p.up} up / ${p.down} down, ${percent(p.rate)} (95 % interval ${interval(p.low, p.high)})`;
      group.append(
        svg("circle", { class: "point", cx: px(p.at), cy: y(p.rate), r: 4, fill: color, stroke: "white", "stroke-width": 1.5 }, svg("title", {}, tip)),
      );
    }
    root.append(group);
  }
  if (!plotted.length) {
    root.append(
      svg(
        "text",
        { class: "empty-note", x: MARGIN.left + plotWidth / 2, y: MARGIN.top + plotHeight / 2, "text-anchor": "middle" },
        "No ratings in this window yet.",
      ),
    );
  }
  return root;
}
