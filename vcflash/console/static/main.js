// The console's router: #/cameras, #/timeline/NAME?t=UNIX&play=1, #/chat, #/search. Each page module's show(view, args,
// params) fills the view and returns an object whose stop() ends its timers when another page is shown.
import { send, start } from "./api.js";
import * as cameras from "./cameras.js";
import * as chat from "./chat.js";
import * as publisher from "./publish.js";
import * as search from "./search.js";
import * as timeline from "./timeline.js";

const pages = { cameras, timeline, chat, search };
let current = null;

function route() {
  const [path, query] = location.hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  const name = parts[0] in pages ? parts[0] : "cameras";
  current?.stop?.();
  const view = document.getElementById("view");
  view.replaceChildren();
  view.dataset.page = name;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === name);
  }
  current = pages[name].show(view, parts.slice(1).map(decodeURIComponent), new URLSearchParams(query || ""));
}

async function signOut() {
  await publisher.stop().catch(() => {}); // signed out, the page could no longer end it
  await send("POST", "/console/signout");
  location.assign("/console/signin");
}

await start();
document.getElementById("signout").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
route();
