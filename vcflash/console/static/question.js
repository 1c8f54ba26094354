// What chat and search share: the camera picker, the time range (UTC), the reasoner's state, and the link from a
// clip to the timeline at its moment, playing it.
import { el, enc, formatTime, getJSON, streamNames } from "./api.js";

// A checkbox per camera (running, or only in memory); picked() gives the checked names.
export function cameraPicker(id) {
  const node = el("fieldset", { class: "cameras-pick", id }, el("legend", {}, "Cameras"));
  streamNames().then((names) => {
    if (!names.length) node.append(el("p", { class: "muted" }, "No camera has clips in memory yet."));
    for (const name of names) {
      node.append(el("label", { class: "check" }, el("input", { type: "checkbox", name: "stream", value: name }), ` ${name}`));
    }
  });
  return { node, picked: () => [...node.querySelectorAll("input:checked")].map((i) => i.value) };
}

// From and To; read() gives {start?, end?} in Unix seconds.
export function rangePicker() {
  const from = el("input", { name: "from", type: "datetime-local", step: "1" });
  const to = el("input", { name: "to", type: "datetime-local", step: "1" });
  const node = el("div", { class: "range" }, el("label", {}, "From (UTC) ", from), el("label", {}, "To (UTC) ", to));
  const read = () => {
    // datetime-local has no zone: read it as UTC, as every time vcflash shows
    const range = {};
    if (from.value) range.start = Date.parse(`${from.value}Z`) / 1000;
    if (to.value) range.end = Date.parse(`${to.value}Z`) / 1000;
    return range;
  };
  return { node, read };
}

// " · START – END" for a range read above; "" when there is none.
export function describeRange({ start, end }) {
  if (start === undefined && end === undefined) return "";
  return ` · ${start === undefined ? "…" : formatTime(start)} – ${end === undefined ? "…" : formatTime(end)}`;
}

// The split deployment's reasoner is another service: say so when it is away (cameras and timelines work on).
export function reasonerNotice(what) {
  const notice = el("p", { class: "error", id: "reasoner-state", role: "status" });
  getJSON("/v1/console/health").then(({ reasoner }) => {
    if (reasoner.available === false) notice.textContent = `The reasoner is unavailable (${reasoner.error}): ${what} fail until it is back.`;
  }, () => {});
  return notice;
}

// A link to the timeline of `stream` at wall time t, where the recording plays (timeline.js reads t and play).
export function momentLink(stream, t, attrs, ...children) {
  return el("a", { ...attrs, href: `#/timeline/${enc(stream)}?t=${t}&play=1` }, ...children);
}
