// The dashboard: connects with the token from the form (or from the page address: #token=...&url=...&channel=...),
// subscribes to one channel with the last 20 messages, and lists what arrives. A Gap is a red row: messages
// may be missing there, so a real dashboard would reload that channel's state from its source of truth.
import { WsdClient } from "../../clients/js/wsd-client.js";

const form = document.getElementById("connect");
const feed = document.getElementById("feed");
const stateEl = document.getElementById("state");
const stats = document.getElementById("stats");
const errorEl = document.getElementById("error");
const stopButton = document.getElementById("disconnect");
let client = null;

function row(cls, text, attrs = {}) {
  const li = document.createElement("li");
  li.className = cls;
  li.textContent = text; // never innerHTML: message data comes from outside
  for (const [k, v] of Object.entries(attrs)) li.dataset[k] = v;
  feed.prepend(li);
  while (feed.children.length > 500) feed.lastChild.remove();
}

function showMessage(m, cls = "msg") {
  const when = m.ts ? new Date(m.ts * 1000).toLocaleTimeString() : "";
  const data = m.decryptError ? `(not decrypted: ${m.decryptError})` : JSON.stringify(m.data);
  row(`${cls}${m.history ? " history" : ""}${m.decryptError ? " decrypt-error" : ""}`,
    `${when} ${m.channel || "(direct)"} #${m.offset} [${m.type}/${m.priority}] ${data}`,
    { offset: String(m.offset), epoch: m.epoch });
}

function showGap(g) {
  const from = g.last ? `#${g.last.offset}` : "the start";
  const to = g.resumed ? `#${g.resumed.offset}` : "now";
  row("gap", `GAP in ${g.channel} between ${from} and ${to}: ${g.reason}`);
}

function showStats() {
  if (!client) return;
  stats.textContent = `connections ${client.connections} · gaps ${client.gaps} · `
    + `duplicates dropped ${client.duplicatesDropped}`;
}

async function connect({ url, token, channel }) {
  if (client) await client.close();
  errorEl.textContent = "";
  feed.replaceChildren();
  client = new WsdClient(url.split(/\s+/).filter(Boolean), {
    token,
    onState: (state) => {
      stateEl.textContent = state;
      stateEl.dataset.state = state;
      showStats();
    },
    onOther: (m) => showMessage(m, "other"),
  });
  stopButton.disabled = false;
  try {
    await client.start();
    const sub = await client.subscribe(channel, { history: 20 });
    sub.on("message", (m) => { showMessage(m); showStats(); });
    sub.on("gap", (g) => { showGap(g); showStats(); });
    sub.on("end", (err) => { if (err) errorEl.textContent = `stopped: ${err.message}`; });
  } catch (err) {
    errorEl.textContent = `${err.message}`;
  }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = new FormData(form);
  connect({ url: f.get("url"), token: f.get("token"), channel: f.get("channel") });
});

stopButton.addEventListener("click", async () => {
  if (client) await client.close();
  stopButton.disabled = true;
});

// #token=...&url=...&channel=... (the fragment never reaches the web server's log), or the same in ?query.
const params = new URLSearchParams(location.hash.slice(1) || location.search.slice(1));
for (const name of ["url", "channel", "token"]) if (params.get(name)) form.elements[name].value = params.get(name);
if (params.get("token")) form.requestSubmit();
