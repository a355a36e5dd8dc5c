// The dashboard: connects with the token from the form (or from the page address: #token=...&url=...&channel=...),
// subscribes to one channel with the last 20 messages, and lists what arrives. A Gap is a red row: messages
// may be missing there, so a real dashboard would reload that channel's state from its source of truth.
// Keys (the form, or #keys=KID=BASE64,...) decrypt the messages of encrypted channel groups in the page.
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
  const enc = m.keyId && !m.decryptError ? ` (decrypted, key ${m.keyId})` : "";
  row(`${cls}${m.history ? " history" : ""}${m.decryptError ? " decrypt-error" : ""}${enc ? " decrypted" : ""}`,
    `${when} ${m.channel || "(direct)"} #${m.offset} [${m.type}/${m.priority}] ${data}${enc}`,
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

/** "kid=base64, kid2=base64" (a key file's text after its key id) -> {kid: base64}; a key is never shown. */
function parseKeys(text) {
  const keys = Object.create(null); // a key id may be any of A-Z a-z 0-9 _ . : - (even "__proto__")
  for (const item of String(text || "").split(/[\s,]+/).filter(Boolean)) {
    const eq = item.indexOf("="); // a key id has no "="; the base64 after it may end with "="
    if (eq < 1) throw new TypeError("keys: give each as KEY_ID=BASE64 (the text of its key file)");
    keys[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return keys;
}

async function connect({ url, token, channel, keys }) {
  if (client) await client.close();
  client = null;
  errorEl.textContent = "";
  feed.replaceChildren();
  try {
    client = new WsdClient(url.split(/\s+/).filter(Boolean), {
      token,
      keys: parseKeys(keys), // checked here: a bad key is an error naming its key id, never the key
      onState: (state) => {
        stateEl.textContent = state;
        stateEl.dataset.state = state;
        showStats();
      },
      onOther: (m) => showMessage(m, "other"),
    });
  } catch (err) {
    errorEl.textContent = err.message;
    return;
  }
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
  connect({ url: f.get("url"), token: f.get("token"), channel: f.get("channel"), keys: f.get("keys") });
});

stopButton.addEventListener("click", async () => {
  if (client) await client.close();
  stopButton.disabled = true;
});

// #token=...&url=...&channel=...&keys=KID=BASE64 (the fragment never reaches the web server's log), or the same
// in ?query (then the token and keys do: use the fragment).
const params = new URLSearchParams(location.hash.slice(1) || location.search.slice(1));
for (const name of ["url", "channel", "token"]) if (params.get(name)) form.elements[name].value = params.get(name);
// URLSearchParams reads "+" as a space; neither a key id nor base64 has spaces, so a space was a "+"
if (params.get("keys")) form.elements.keys.value = params.get("keys").replace(/ /g, "+");
if (params.get("token")) form.requestSubmit();
