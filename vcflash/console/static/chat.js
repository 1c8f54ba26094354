// Chat: pick cameras and an optional time range (UTC), ask; the answer streams in (one JSON object a line) and
// its evidence shows as thumbnails, each a link to that moment on the timeline, played.
import { ApiError, el, enc, formatTime, getJSON, send, streamNames, thumbnailURL } from "./api.js";

const turns = []; // this page load's questions and answers, kept while other pages are shown

export function show(view) {
  const cameras = el("fieldset", { class: "cameras-pick", id: "chat-streams" }, el("legend", {}, "Cameras"));
  const from = el("input", { name: "from", type: "datetime-local", step: "1" });
  const to = el("input", { name: "to", type: "datetime-local", step: "1" });
  const question = el("textarea", { name: "question", rows: "3", required: true, placeholder: "What happened?" });
  const log = el("section", { class: "turns", id: "turns" });
  const notice = el("p", { class: "error", id: "reasoner-state", role: "status" });
  const form = el(
    "form",
    { class: "card ask", id: "ask" },
    cameras,
    el("div", { class: "range" }, el("label", {}, "From (UTC) ", from), el("label", {}, "To (UTC) ", to)),
    el("label", {}, "Question ", question),
    el("button", { type: "submit" }, "Ask"),
  );
  view.append(el("h1", {}, "Chat"), notice, log, form);
  for (const turn of turns) log.append(turn.node);

  streamNames().then((names) => {
    if (!names.length) cameras.append(el("p", { class: "muted" }, "No camera has clips in memory yet."));
    for (const name of names) {
      cameras.append(el("label", { class: "check" }, el("input", { type: "checkbox", name: "stream", value: name }), ` ${name}`));
    }
  });

  // the split deployment's reasoner is another service: say so when it is away (cameras and timelines work on)
  getJSON("/v1/console/health").then(({ reasoner }) => {
    if (reasoner.available === false) notice.textContent = `The reasoner is unavailable (${reasoner.error}): questions fail until it is back.`;
  }, () => {});

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const streams = [...cameras.querySelectorAll("input:checked")].map((i) => i.value);
    const body = { streams, question: question.value };
    // datetime-local has no zone: read it as UTC, as every time vcflash shows
    if (from.value) body.start = Date.parse(`${from.value}Z`) / 1000;
    if (to.value) body.end = Date.parse(`${to.value}Z`) / 1000;
    const turn = newTurn(body);
    turns.push(turn);
    log.append(turn.node);
    ask(body, turn);
  });
  return {};
}

function newTurn(body) {
  const answer = el("p", { class: "answer", dataset: { state: "waiting", pieces: "0" } });
  const evidence = el("div", { class: "evidence" });
  const node = el(
    "article",
    { class: "turn card" },
    el("p", { class: "question" }, el("strong", {}, "Q "), body.question),
    el("p", { class: "muted" }, `${body.streams.join(", ") || "no camera"}${range(body)}`),
    answer,
    evidence,
  );
  return { node, answer, evidence };
}

function range({ start, end }) {
  if (start === undefined && end === undefined) return "";
  return ` · ${start === undefined ? "…" : formatTime(start)} – ${end === undefined ? "…" : formatTime(end)}`;
}

async function ask(body, { answer, evidence }) {
  answer.textContent = "…";
  let text = "";
  try {
    const response = await send("POST", "/v1/console/ask", body);
    answer.dataset.state = "streaming";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines.filter(Boolean)) {
        const event = JSON.parse(line);
        if (event.text !== undefined) {
          text += event.text;
          answer.dataset.pieces = Number(answer.dataset.pieces) + 1;
          answer.textContent = text;
        } else if (event.result) {
          answer.textContent = event.result.answer || "(the model gave an empty answer)";
          showEvidence(evidence, event.result);
        } else if (event.error) {
          throw new ApiError(500, event.error);
        }
      }
    }
    answer.dataset.state = "done";
  } catch (e) {
    answer.dataset.state = "error";
    answer.classList.add("error");
    answer.textContent = e.message;
  }
}

function showEvidence(box, result) {
  const note = result.note ? ` (${result.note})` : "";
  box.append(el("p", { class: "muted" }, `${result.evidence.length} clips, ${result.frames} frames${note}`));
  for (const clip of result.evidence) {
    const href = `#/timeline/${enc(clip.stream_id)}?t=${clip.wall_start}&play=1`;
    box.append(
      el(
        "a",
        { class: "evidence-clip", href, dataset: { stream: clip.stream_id, seq: clip.seq } },
        el("img", { src: thumbnailURL(clip.stream_id, clip.seq), alt: `${clip.stream_id} clip ${clip.seq}` }),
        el("span", {}, `${clip.stream_id} #${clip.seq} ${formatTime(clip.wall_start, false)}`),
      ),
    );
  }
}
