// Decryption against a real daemon that encrypts (the wire contract: docs/security.md): started by
// tests/test_js_client.py with an encrypted channel group `sig` (encrypt = "k1") and a plain group `plain`.
// WSD_PORT, WSD_SOCKET, WSD_CONFIG (its config file, rewritten here to rotate the key id), WSD_KEY1 / WSD_KEY2
// (the texts of the key files `wsd keygen` wrote for k1 / k2; k2 is in [encryption.keys] but unused at start).

import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { after, test } from "node:test";

import { Keyring, Message, WsdClient } from "../wsd-client.js";
import { ctl, env, take, token, waitFor } from "./helpers.js";

const PORT = env("WSD_PORT");
const SOCKET = env("WSD_SOCKET");
const CONFIG = env("WSD_CONFIG");
const KEY1 = env("WSD_KEY1"); // a key file's text: standard base64 and a newline
const KEY2 = env("WSD_KEY2");
const url = (pool) => `ws://127.0.0.1:${PORT}/ws/${pool}`;
const FAST = { backoffBase: 0.05, backoffCap: 0.2, connectTimeout: 10, requestTimeout: 5 };
const CH = "sig/acme";
const WRONG = crypto.getRandomValues(new Uint8Array(32));
const bytes = (text) => Uint8Array.from(Buffer.from(text.trim(), "base64"));
// Plaintext the daemon's JSON encoder writes as raw UTF-8 (not \u escapes), floats, nesting, an empty string.
const VALUE = { px: 1.0849, qty: -3, note: "é€ 中文 😀 \"q\" \\ /", tags: ["a", "", null, true], deep: { x: [1.5e-7] } };

const made = [];

async function client(user, pool, options = {}) {
  const c = new WsdClient(url(pool), { token: await token(SOCKET, user), ...FAST, ...options });
  made.push(c);
  await c.start();
  return c;
}

// A failed assertion leaves its clients open (reconnecting for ever once the daemon stops): close them all, so
// the process ends whatever happened.
after(async () => {
  for (const c of made) await c.close().catch(() => {});
});

const isEnvelope = (d, kid) => Object.keys(d).sort().join() === "ct,iv,kid" && d.kid === kid
  && /^[A-Za-z0-9_-]+$/.test(d.iv) && /^[A-Za-z0-9_-]+$/.test(d.ct);

test("what the daemon encrypts is decrypted live, in history() and in a subscribe replay", async () => {
  const pub = await client("pub", "api");
  const c = await client("bob", "frontend", { keys: { k1: KEY1 } }); // a key file's text, newline and all
  const raw = await client("eve", "frontend"); // no keys: sees what is on the wire
  const sub = await c.subscribe("sig");
  const rawSub = await raw.subscribe("sig");
  const sent = [
    await pub.publish("sig", VALUE, { type: "trading_signal", priority: "high" }), // a client publication
    await ctl(SOCKET, "publish", { channel: CH, type: "op", data: { n: 2 } }), // an operator publication
    await pub.publish("sig", ["list", 1], { type: "trading_signal" }), // data need not be an object
  ];
  const want = [VALUE, { n: 2 }, ["list", 1]];
  const live = [await take(sub), await take(sub), await take(sub)];
  assert.ok(live.every((m) => m instanceof Message));
  assert.deepEqual(live.map((m) => [m.channel, m.offset, m.data, m.keyId, m.decryptError]),
    sent.map((s, i) => [CH, s.offset, want[i], "k1", null]));
  assert.deepEqual([live[0].type, live[0].priority, live[1].type], ["trading_signal", "high", "op"]);
  // the same frames without a key: the envelope, never the plaintext
  const onWire = [await take(rawSub), await take(rawSub), await take(rawSub)];
  for (const m of onWire) {
    assert.ok(isEnvelope(m.data, "k1"), JSON.stringify(m.data));
    assert.equal(m.decryptError, "no key for kid 'k1'");
    assert.equal(Buffer.from(m.data.iv, "base64url").length, 12);
  }
  assert.ok(!JSON.stringify(onWire.map((m) => m.data)).includes("EURUSD") && !JSON.stringify(onWire).includes("€"));
  const page = await c.history("sig");
  assert.deepEqual([...page].map((m) => [m.offset, m.data, m.keyId, m.decryptError, m.history]),
    sent.map((s, i) => [s.offset, want[i], "k1", null, true]));
  // a second client subscribing with history gets the same replay decrypted, keys as Uint8Array this time
  const late = await client("carol", "frontend", { keys: { k1: bytes(KEY1) } });
  const lsub = await late.subscribe("sig", { history: { limit: 3 } });
  const replay = [await take(lsub), await take(lsub), await take(lsub)];
  assert.deepEqual(replay.map((m) => [m.offset, m.data, m.keyId]), sent.map((s, i) => [s.offset, want[i], "k1"]));
  // a plain group next to it stays plain
  const plain = await c.subscribe("plain");
  await pub.publish("plain", { y: 1 });
  const p = await take(plain);
  assert.deepEqual([p.data, p.keyId, p.decryptError], [{ y: 1 }, null, null]);
  for (const x of [pub, c, raw, late]) await x.close();
});

test("a wrong key: decryptError is set and every message is still delivered, in order, and acked", async () => {
  const pub = await client("pub", "api");
  const c = await client("mallory", "frontend", { keys: { k1: WRONG } });
  const sub = await c.subscribe("sig");
  const cid = c.welcome.connection_id;
  const sent = [];
  for (let n = 0; n < 3; n++) sent.push(await pub.publish("sig", { n }, { type: "trading_signal" }));
  sent.push(await ctl(SOCKET, "publish", { channel: CH, type: "order", data: { qty: 1 } })); // reliable (the rule)
  const got = [];
  for (let i = 0; i < 4; i++) got.push(await take(sub));
  assert.deepEqual(got.map((m) => [m.offset, m.keyId, m.decryptError]),
    sent.map((s) => [s.offset, "k1", "authentication failed"]));
  for (const m of got) assert.ok(isEnvelope(m.data, "k1"), JSON.stringify(m.data));
  assert.equal(got[3].seq, 1); // the reliable one was taken, so it is acked although it cannot be read
  await waitFor(async () => (await ctl(SOCKET, "connections.get", { id: cid })).reliable.unacked === 0, 5, "acked");
  assert.equal(c.gaps, 0);
  const page = await c.history("sig", { limit: 4 });
  assert.deepEqual([...page].map((m) => [m.offset, m.keyId, m.decryptError]),
    sent.map((s) => [s.offset, "k1", "authentication failed"]));
  await pub.close();
  await c.close();
});

test("an envelope from the daemon opens only on its own channel instance (the AAD)", async () => {
  const raw = await client("eve", "frontend"); // no keys: the envelope as the daemon stored it
  const [m] = (await raw.history("sig", { limit: 1 })).messages;
  assert.equal(m.decryptError, "no key for kid 'k1'");
  const ring = new Keyring({ k1: KEY1 });
  const frame = { channel: CH, enc: "A256GCM", data: m.data };
  const opened = await ring.open(frame);
  assert.deepEqual([opened.keyId, opened.decryptError], ["k1", null]);
  const moved = await ring.open({ ...frame, channel: "sig/globex" });
  assert.deepEqual([moved.keyId, moved.decryptError, moved.data], ["k1", "authentication failed", m.data]);
  await raw.close();
});

test("after a reload rotates the key id, old and new messages both decrypt with their own kid", async () => {
  const pub = await client("pub", "api");
  const before = await pub.publish("sig", { era: 1 });
  writeFileSync(CONFIG, readFileSync(CONFIG, "utf8").replace('encrypt = "k1"', 'encrypt = "k2"'));
  const r = await ctl(SOCKET, "reload");
  assert.deepEqual(r.errors, []);
  const after = await pub.publish("sig", { era: 2 });
  const c = await client("bob", "frontend", { keys: { k1: KEY1, k2: KEY2 } });
  const page = await c.history("sig", { limit: 2 });
  assert.deepEqual([...page].map((m) => [m.offset, m.data, m.keyId, m.decryptError]),
    [[before.offset, { era: 1 }, "k1", null], [after.offset, { era: 2 }, "k2", null]]);
  const only2 = await client("bob", "frontend", { keys: { k2: KEY2 } });
  const page2 = await only2.history("sig", { limit: 2 });
  assert.deepEqual([...page2].map((m) => [m.keyId, m.decryptError]), [["k1", "no key for kid 'k1'"], ["k2", null]]);
  for (const x of [pub, c, only2]) await x.close();
});
