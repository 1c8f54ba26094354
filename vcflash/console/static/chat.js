// Chat: pick cameras and an optional time range (UTC), ask; the answer streams in (one JSON object a line) and
// its evidence shows as thumbnails, each a link to that moment on the timeline, played.
import { ApiError, el, formatTime, send, thumbnailURL } from "./api.js";
import { cameraPicker, describeRange, momentLink, rangePicker, reasonerNotice } from "./question.js";

const turns = []; // this page load's questions and answers, kept while other pages are shown

export function show(view) {
  const cameras = cameraPicker("chat-streams");
  const range = rangePicker();
  const question = el("textarea", { name: "question", rows: "3", required: true, placeholder: "What happened?" });
  const log = el("section", { class: "turns", id: "turns" });
  const form = el(
    "form",
    { class: "card ask", id: "ask" },
    cameras.node,
    range.node,
    el("label", {}, "Question ", question),
    el("button", { type: "submit" }, "Ask"),
  );
  view.append(el("h1", {}, "Chat"), reasonerNotice("questions"), log, form);
  for (const turn of turns) log.append(turn.node);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = { streams: cameras.picked(), question: question.value, ...range.read() };
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
    el("p", { class: "muted" }, `${body.streams.join(", ") || "no camera"}${describeRange(body)}`),
    answer,
    evidence,
  );
  return { node, answer, evidence };
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
    box.append(
      momentLink(
        clip.stream_id,
        clip.wall_start,
        { class: "evidence-clip", dataset: { stream: clip.stream_id, seq: clip.seq } },
        el("img", { src: thumbnailURL(clip.stream_id, clip.seq), alt: `${clip.stream_id} clip ${clip.seq}` }),
        el("span", {}, `${clip.stream_id} #${clip.seq} ${formatTime(clip.wall_start, false)}`),
      ),
    );
  }
}
