// Timeline of one camera: its stored clips over a window of wall time as a strip of thumbnails, gaps marked;
// a click shows the clip and, when the stream records, plays the recording cut around it.
// #/timeline/NAME?t=UNIX&play=1 opens the window around t and plays the clip there (chat's evidence and search's
// moments link here).
import { el, enc, formatDuration, formatTime, getJSON, recording, streamNames, thumbnailURL } from "./api.js";

const SPANS = [
  ["10 s", 10],
  ["1 min", 60],
  ["10 min", 600],
  ["1 h", 3600],
  ["6 h", 21600],
  ["1 day", 86400],
  ["7 days", 604800],
];
const PAD_S = 2; // recording played before and after a clip
const FOLLOW_MS = 5000; // a window at the latest clips is reloaded this often, so a live camera's new clips show

export function show(view, [name], params) {
  const picker = el("select", { id: "timeline-stream", "aria-label": "camera" });
  const spanPicker = el("select", { id: "timeline-span", "aria-label": "window" });
  for (const [label, seconds] of SPANS) spanPicker.append(el("option", { value: seconds }, label));
  spanPicker.value = "600";
  const range = el("span", { class: "range muted" });
  const strip = el("div", { class: "strip", id: "strip" });
  const detail = el("section", { class: "detail card", id: "clip-detail", hidden: true });
  const status = el("p", { class: "status" });
  let end = null; // the window's end (wall time); null: the stream's last clip
  let following = !params.has("t"); // the window ends at the latest clip and moves with it
  let selected = null; // the seq of the clip shown below the strip
  let recorded = false;
  let player = null; // the blob URL playing, revoked when replaced

  const move = (factor) => {
    if (end !== null) {
      following = false;
      end += factor * Number(spanPicker.value);
      load();
    }
  };
  const latest = () => {
    following = true;
    end = null;
    load();
  };
  view.append(
    el("h1", {}, "Timeline"),
    el(
      "div",
      { class: "toolbar" },
      picker,
      spanPicker,
      el("button", { type: "button", onclick: () => move(-1) }, "◀ earlier"),
      el("button", { type: "button", onclick: () => move(1) }, "later ▶"),
      el("button", { type: "button", onclick: latest }, "latest"),
      range,
    ),
    status,
    strip,
    detail,
  );
  picker.addEventListener("change", () => (location.hash = `#/timeline/${enc(picker.value)}`));
  spanPicker.addEventListener("change", () => load());

  async function load(focus = null) {
    if (!name) return;
    const span = Number(spanPicker.value);
    if (!strip.childElementCount) status.textContent = "Loading…";
    try {
      if (end === null) {
        const info = await getJSON(`/v1/console/streams/${enc(name)}/clips?limit=1`);
        end = focus !== null ? focus + span / 2 : info.last ? info.last.wall_end : Date.now() / 1000;
      }
      const start = end - span;
      const data = await getJSON(`/v1/console/streams/${enc(name)}/clips?start=${start}&end=${end}&limit=240`);
      recorded = data.recorded;
      range.textContent = `${formatTime(start)} – ${formatTime(end, false)}`;
      status.textContent = data.clips.length
        ? data.truncated
          ? `The first ${data.clips.length} clips of this window: zoom in for the rest.`
          : `${data.clips.length} clips${recorded ? ", recorded" : ""}.`
        : "No clip in this window.";
      drawStrip(data.clips);
      if (focus !== null) {
        const clip = data.clips.find((c) => c.wall_start <= focus && focus < c.wall_end) || data.clips[0];
        if (clip) open(clip, params.get("play") === "1");
      }
    } catch (e) {
      status.textContent = e.message;
      strip.replaceChildren();
    }
  }

  function drawStrip(clips) {
    const items = [];
    clips.forEach((clip, i) => {
      const previous = clips[i - 1];
      const gap = previous ? clip.wall_start - previous.wall_end : 0;
      const length = clip.wall_end - clip.wall_start;
      if (previous && gap > Math.max(1, length / 2)) {
        items.push(el("div", { class: "gap", title: "no video" }, `gap ${formatDuration(gap)}`));
      }
      items.push(
        el(
          "button",
          {
            type: "button",
            class: clip.seq === selected ? "clip selected" : "clip",
            dataset: { seq: clip.seq },
            onclick: () => open(clip, true),
          },
          el("img", { src: thumbnailURL(name, clip.seq), alt: `clip ${clip.seq}`, loading: "lazy" }),
          el("span", {}, formatTime(clip.wall_start, false)),
        ),
      );
    });
    strip.replaceChildren(...items);
  }

  async function open(clip, play) {
    selected = clip.seq;
    for (const b of strip.querySelectorAll(".clip")) b.classList.toggle("selected", b.dataset.seq === String(clip.seq));
    const times = `${formatTime(clip.wall_start)} – ${formatTime(clip.wall_end, false)} (media ${clip.media_start.toFixed(1)}–${clip.media_end.toFixed(1)} s)`;
    const note = el("p", { class: "muted" });
    detail.hidden = false;
    detail.dataset.seq = clip.seq;
    detail.replaceChildren(
      el("h2", {}, `${name} · clip ${clip.seq}`),
      el("p", {}, times),
      el("img", { class: "large", src: thumbnailURL(name, clip.seq), alt: `clip ${clip.seq}` }),
      note,
    );
    if (!recorded) {
      note.textContent = "This camera is not recorded: only its thumbnails are kept.";
      return;
    }
    const video = el("video", { id: "player", controls: true, muted: true, playsinline: true });
    video.muted = true; // muted, so the browser lets it start without a click
    detail.append(video);
    note.textContent = "Loading the recording…";
    try {
      const cut = await recording(name, clip.wall_start - PAD_S, clip.wall_end + PAD_S);
      if (player) URL.revokeObjectURL(player);
      player = cut.url;
      Object.assign(video.dataset, { recordingStart: cut.start, clipStart: clip.wall_start, clipEnd: clip.wall_end });
      video.src = cut.url;
      video.addEventListener("loadedmetadata", () => (video.currentTime = Math.max(0, clip.wall_start - cut.start)), {
        once: true,
      });
      video.addEventListener("playing", () => (video.dataset.state = "playing"), { once: true });
      note.textContent = `Recording from ${formatTime(cut.start, false)}; the clip starts ${Math.max(0, clip.wall_start - cut.start).toFixed(1)} s in.`;
      if (play) await video.play();
    } catch (e) {
      note.textContent = `No recording to play: ${e.message}`;
    }
  }

  streamNames().then((names) => {
    picker.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (!name && names.length) name = names[0];
    if (name && !names.includes(name)) picker.append(el("option", { value: name }, name));
    picker.value = name || "";
    if (!name) status.textContent = "No camera has clips in memory yet.";
    const t = Number(params.get("t"));
    load(params.has("t") && Number.isFinite(t) ? t : null);
  });
  const timer = setInterval(() => {
    if (following && name) {
      end = null;
      load();
    }
  }, FOLLOW_MS);
  return {
    stop: () => {
      clearInterval(timer);
      if (player) URL.revokeObjectURL(player);
    },
  };
}
