// Search: pick cameras and an optional time range (UTC), say what to find; the moments that match best show first,
// each as its clips' thumbnails with its camera, times and score, and a link to the timeline there, played.
import { el, formatDuration, formatTime, send, thumbnailURL } from "./api.js";
import { cameraPicker, describeRange, momentLink, rangePicker, reasonerNotice } from "./question.js";

const MAX_THUMBS = 6; // thumbnails a moment shows; a longer one shows them spread evenly over its clips
// the last search's outcome, kept while other pages are shown (a moment's link leads to the timeline, Back returns)
const status = el("p", { class: "status", id: "search-status", role: "status" });
const results = el("ol", { class: "moments", id: "moments" });

export function show(view) {
  const cameras = cameraPicker("search-streams");
  const range = rangePicker();
  const question = el("input", { name: "question", type: "search", required: true, placeholder: "a person at the door" });
  const limit = el("input", { name: "limit", type: "number", min: "1", max: "100", value: "10", required: true });
  const form = el(
    "form",
    { class: "card ask", id: "search" },
    cameras.node,
    range.node,
    el("div", { class: "query" }, el("label", { class: "grow" }, "Find ", question), el("label", {}, "Moments ", limit)),
    el("button", { type: "submit" }, "Search"),
  );
  view.append(el("h1", {}, "Search"), reasonerNotice("searches"), form, status, results);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { streams: cameras.picked(), question: question.value, limit: Number(limit.value), ...range.read() };
    const what = `“${body.question}” in ${body.streams.join(", ") || "no camera"}${describeRange(body)}`;
    setStatus("searching", `Searching ${what}…`);
    results.replaceChildren();
    try {
      const found = await (await send("POST", "/v1/console/search", body)).json();
      const note = found.note ? ` (${found.note})` : "";
      setStatus("done", `${found.moments.length} moments for ${what}, from ${found.clips_scored} clips${note}.`);
      results.replaceChildren(...found.moments.map(moment));
    } catch (e) {
      setStatus("error", e.message);
    }
  });
  return {};
}

function setStatus(state, text) {
  status.dataset.state = state;
  status.classList.toggle("error", state === "error");
  status.textContent = text;
}

function moment(m) {
  const clips = m.last_seq - m.first_seq + 1;
  return el(
    "li",
    { class: "moment card", dataset: { stream: m.stream_id, start: m.wall_start, end: m.wall_end } },
    momentLink(
      m.stream_id,
      m.wall_start,
      { class: "moment-link" },
      el(
        "div",
        { class: "thumbs" },
        spread(m.first_seq, m.last_seq).map((seq) =>
          el("img", { src: thumbnailURL(m.stream_id, seq), alt: `${m.stream_id} clip ${seq}` }),
        ),
      ),
      el(
        "p",
        {},
        el("strong", {}, m.stream_id),
        ` ${formatTime(m.wall_start)} – ${formatTime(m.wall_end, false)} (${formatDuration(m.wall_end - m.wall_start)})`,
      ),
      el("p", { class: "muted" }, `score ${m.score.toFixed(3)} · ${clips === 1 ? `clip ${m.first_seq}` : `clips ${m.first_seq}–${m.last_seq}`}`),
    ),
  );
}

// The seqs from first to last, at most MAX_THUMBS of them, spread evenly (both ends kept).
function spread(first, last) {
  const n = last - first + 1;
  if (n <= MAX_THUMBS) return Array.from({ length: n }, (_, i) => first + i);
  return Array.from({ length: MAX_THUMBS }, (_, i) => first + Math.round((i * (n - 1)) / (MAX_THUMBS - 1)));
}
