// Publish this browser's camera as a stream: getUserMedia, a send-only RTCPeerConnection, and its offer (with every
// ICE candidate: the server takes no trickle) POSTed to /v1/console/whip/NAME, which the server answers with its
// WHIP endpoint's own logic. The publication outlives page changes in the console; Stop, signing out or leaving
// the page ends it.
import { el, enc, send, sendOnLeave } from "./api.js";

const GATHER_MS = 5000; // the longest we wait for ICE candidates before sending the offer with what we have

let current = null; // {name, pc, media} while publishing

async function gathered(pc) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, GATHER_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

function release({ pc, media }) {
  pc.close();
  for (const track of media.getTracks()) track.stop();
}

async function publish(name, record, onState) {
  if (!navigator.mediaDevices) {
    throw new Error("this page cannot use a camera: open the console over https (VCFLASH_TLS_CERT) or on localhost");
  }
  const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  const pc = new RTCPeerConnection({ iceServers: [] });
  const entry = { name, pc, media };
  try {
    for (const track of media.getVideoTracks()) pc.addTransceiver(track, { direction: "sendonly", streams: [media] });
    pc.addEventListener("connectionstatechange", () => onState(pc.connectionState));
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const path = `/v1/console/whip/${enc(name)}${record ? "?record=1" : ""}`;
    const response = await send("POST", path, pc.localDescription.sdp, "application/sdp");
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  } catch (e) {
    release(entry);
    throw e;
  }
  current = entry;
  return entry;
}

// End the publication, if any: the server ends the stream (its memory stays), then the camera is let go.
export async function stop() {
  if (!current) return;
  const entry = current;
  current = null;
  try {
    await send("DELETE", `/v1/console/whip/${enc(entry.name)}`);
  } catch (e) {
    if (e.status !== 404) throw e; // 404: it had already ended
  } finally {
    release(entry);
  }
}

window.addEventListener("pagehide", () => {
  if (current) sendOnLeave("DELETE", `/v1/console/whip/${enc(current.name)}`);
});

// The cameras page's control: a stream name, record, Start/Stop, the state of the connection and a preview.
export function control(refresh) {
  const status = el("p", { class: "status", role: "status" });
  const preview = el("video", { class: "preview", autoplay: true, playsinline: true, hidden: true });
  preview.muted = true;
  const startButton = el("button", { type: "submit", class: "start" }, "Start");
  const stopButton = el("button", { type: "button", class: "stop danger" }, "Stop");
  const form = el(
    "form",
    { class: "card add publish", id: "publish" },
    el("h2", {}, "Publish this browser's camera"),
    el("label", {}, "Stream name ", el("input", { name: "name", required: true, maxlength: "64" })),
    el("label", { class: "check" }, el("input", { name: "record", type: "checkbox" }), " record video"),
    el("div", { class: "actions" }, startButton, stopButton),
    status,
    preview,
  );
  const f = form.elements;

  function show(state, message, isError = false) {
    form.dataset.state = state;
    startButton.disabled = state !== "idle";
    stopButton.disabled = state === "idle";
    f.name.disabled = f.record.disabled = state !== "idle";
    status.className = isError ? "status error" : "status";
    status.textContent = message;
    preview.hidden = !current;
    const media = current ? current.media : null;
    if (preview.srcObject !== media) preview.srcObject = media;
  }

  function onState(connection) {
    if (!current) return;
    const ended = connection === "failed" || connection === "closed";
    show(ended ? "ended" : "publishing", `Publishing ${current.name}: ${connection}.`, ended);
  }

  if (current) {
    f.name.value = current.name;
    show("publishing", `Publishing ${current.name}: ${current.pc.connectionState}.`);
    current.pc.addEventListener("connectionstatechange", () => onState(current?.pc.connectionState));
  } else {
    show("idle", "");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = f.name.value.trim();
    show("starting", `Starting ${name}…`);
    try {
      await publish(name, f.record.checked, onState);
      onState(current.pc.connectionState);
      refresh();
    } catch (e) {
      show("idle", `Could not publish ${name}: ${e.message}`, true);
    }
  });
  stopButton.addEventListener("click", async () => {
    const name = current?.name;
    try {
      await stop();
      show("idle", name ? `Stopped ${name}.` : "");
    } catch (e) {
      show("idle", `Could not stop ${name}: ${e.message}`, true);
    }
    refresh();
  });
  return form;
}
