// The console's calls to its server: JSON over fetch with the session cookie (same origin only); calls that
// change something carry the session's CSRF token in a header. Pages build DOM with el(), never innerHTML.

let csrf = null;

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The session's CSRF token, fetched once per page load.
export async function start() {
  const session = await getJSON("/v1/console/session");
  csrf = session.csrf;
  return session;
}

async function check(response) {
  if (response.status === 401) {
    location.assign("/console/signin");
    throw new ApiError(401, "signed out");
  }
  if (!response.ok) {
    let message = response.statusText;
    try {
      message = (await response.json()).error || message;
    } catch {
      // not JSON: keep the status text
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

export async function getJSON(path) {
  return (await check(await fetch(path, { credentials: "same-origin" }))).json();
}

// A state-changing call; the response, checked (4xx/5xx throw ApiError with the server's message). The body is
// sent as JSON unless another type is given (then as it is).
export async function send(method, path, body, type = "application/json") {
  const headers = { "X-CSRF-Token": csrf };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = type;
    init.body = type === "application/json" ? JSON.stringify(body) : body;
  }
  return check(await fetch(path, init));
}

// A state-changing call made as the page goes away: the browser finishes it after the page is gone.
export function sendOnLeave(method, path) {
  const init = { method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin", keepalive: true };
  fetch(path, init).catch(() => {});
}

// Running streams and the names memory holds, for pickers.
export async function streamNames() {
  const list = await getJSON("/v1/console/streams");
  return [...new Set([...list.streams.map((s) => s.name), ...list.stored])].sort();
}

export const enc = encodeURIComponent;

export function thumbnailURL(stream, seq) {
  return `/v1/streams/${enc(stream)}/thumbnails/${seq}.jpg`;
}

// A recorded moment as a blob: URL, and the wall time its first frame shows (the cut starts at a keyframe).
export async function recording(stream, start, end) {
  const path = `/v1/streams/${enc(stream)}/recording.mp4?start=${start.toFixed(3)}&end=${end.toFixed(3)}`;
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) throw new ApiError(response.status, (await response.text()).trim());
  const first = Number(response.headers.get("X-Recording-Start"));
  return { url: URL.createObjectURL(await response.blob()), start: first };
}

// Every time on the page is UTC, as everywhere in vcflash.
export function formatTime(unix, withDate = true) {
  if (unix === null || unix === undefined) return "–";
  const iso = new Date(unix * 1000).toISOString();
  return withDate ? `${iso.slice(0, 10)} ${iso.slice(11, 19)} UTC` : iso.slice(11, 19);
}

export function formatDuration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

// An element with attributes (on* keys are listeners) and children (strings become text nodes).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}
