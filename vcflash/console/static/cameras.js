// Cameras: every running stream with its state, rate, drops and last thumbnail (polled every 2 s); add a camera
// by URL, remove one, or publish this browser's camera (publish.js). URLs come from the server redacted: a camera's password never reaches the page.
import { el, enc, formatTime, getJSON, send, thumbnailURL } from "./api.js";
import * as publisher from "./publish.js";

const POLL_MS = 2000;

export function show(view) {
  const cards = new Map(); // name -> {card, img, info}
  const list = el("section", { class: "cameras", id: "cameras" });
  const notice = el("p", { class: "error", role: "alert", hidden: true });
  const forms = el("div", { class: "forms" }, addForm(refresh), publisher.control(refresh));
  view.append(el("h1", {}, "Cameras"), notice, list, forms);

  async function refresh() {
    let data;
    try {
      data = await getJSON("/v1/console/streams");
    } catch (e) {
      notice.hidden = false;
      notice.textContent = `Cannot list the cameras: ${e.message}`;
      return;
    }
    notice.hidden = !data.memory_error;
    notice.textContent = data.memory_error ? `Memory unavailable: ${data.memory_error}` : "";
    const names = new Set(data.streams.map((s) => s.name));
    for (const [name, entry] of cards) {
      if (!names.has(name)) {
        entry.card.remove();
        cards.delete(name);
      }
    }
    for (const s of data.streams) {
      if (!cards.has(s.name)) {
        const entry = newCard(s.name, refresh);
        cards.set(s.name, entry);
        list.append(entry.card);
      }
      update(cards.get(s.name), s);
    }
    if (!data.streams.length && !list.querySelector(".empty")) {
      list.append(el("p", { class: "muted empty" }, "No camera yet: add one below."));
    } else if (data.streams.length) {
      list.querySelector(".empty")?.remove();
    }
  }

  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return { stop: () => clearInterval(timer) };
}

function newCard(name, refresh) {
  const img = el("img", { class: "thumb", alt: `last picture of ${name}`, hidden: true });
  const info = el("dl", { class: "stats" });
  const remove = async () => {
    if (!confirm(`Remove camera ${name}? What memory holds of it stays.`)) return;
    try {
      await send("DELETE", `/v1/console/streams/${enc(name)}`);
    } catch (e) {
      alert(`Could not remove ${name}: ${e.message}`);
    }
    refresh();
  };
  const card = el(
    "article",
    { class: "camera card", dataset: { name } },
    el("a", { href: `#/timeline/${enc(name)}`, class: "thumb-link" }, img, el("span", { class: "muted" }, "no picture yet")),
    el("h2", {}, name, " ", el("span", { class: "state" })),
    el("p", { class: "url" }),
    info,
    el("p", { class: "error" }),
    el(
      "div",
      { class: "actions" },
      el("a", { href: `#/timeline/${enc(name)}`, class: "button" }, "Timeline"),
      el("button", { type: "button", class: "remove danger", onclick: remove }, "Remove"),
    ),
  );
  return { card, img, info };
}

function update({ card, img, info }, s) {
  const state = card.querySelector(".state");
  state.textContent = s.state;
  state.className = `state state-${s.state}`;
  card.dataset.state = s.state;
  card.querySelector(".url").textContent = s.url;
  card.querySelector(".error").textContent = s.error;
  if (s.last_clip) {
    const src = thumbnailURL(s.name, s.last_clip.seq);
    if (img.getAttribute("src") !== src) img.src = src;
    img.hidden = false;
    card.dataset.seq = s.last_clip.seq;
  }
  const rows = [
    ["fps", s.fps.toFixed(s.fps < 1 ? 2 : 1)],
    ["frames in", s.frames_in],
    ["dropped", s.frames_dropped],
    ["clips stored", s.clips_stored],
    ["reconnects", s.reconnects],
    ["last frame", formatTime(s.last_wall_time)],
    ["recording", s.record ? `${(s.recording_bytes / 1e6).toFixed(1)} MB` : "off"],
  ];
  info.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

function addForm(refresh) {
  const status = el("p", { class: "status", role: "status" });
  const form = el(
    "form",
    { class: "card add", id: "add-camera" },
    el("h2", {}, "Add a camera"),
    el("label", {}, "Name ", el("input", { name: "name", required: true, maxlength: "64" })),
    el("label", {}, "URL ", el("input", { name: "url", required: true, placeholder: "rtsp://user:pass@host/stream" })),
    el("label", {}, "fps ", el("input", { name: "fps", type: "number", min: "0.01", step: "any", value: "1" })),
    el("label", { class: "check" }, el("input", { name: "record", type: "checkbox" }), " record video"),
    el("label", { class: "check" }, el("input", { name: "realtime", type: "checkbox", checked: true }), " files play in real time"),
    el("button", { type: "submit" }, "Add"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = form.elements;
    const body = {
      name: f.name.value.trim(),
      url: f.url.value.trim(),
      record: f.record.checked,
      realtime: f.realtime.checked,
    };
    if (f.fps.value) body.fps = Number(f.fps.value);
    status.className = "status";
    status.textContent = "Adding…";
    try {
      await send("POST", "/v1/console/streams", body);
      status.textContent = `Added ${body.name}.`;
      f.url.value = ""; // it may hold a password: do not leave it on the page
      refresh();
    } catch (e) {
      status.className = "status error";
      status.textContent = e.message;
    }
  });
  return form;
}
