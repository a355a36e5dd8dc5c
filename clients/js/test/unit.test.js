// Pure parts: backoff, the close-code table against docs/protocol.md, token exp, and decryption of A256GCM
// envelopes built here with WebCrypto as docs/client-js.md ("Encrypted messages") describes the wire format.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  Backoff, CLOSE_ACTIONS, closeAction, Keyring, tokenExp, UNKNOWN_CLOSE, WsdClient,
} from "../wsd-client.js";

const ROOT = new URL("../../../", import.meta.url);

test("backoff is exponential with full jitter", () => {
  const top = new Backoff(0.5, 4.0, () => 1.0);
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((n) => top.delay(n)), [0.5, 1, 2, 4, 4, 4]);
  assert.equal(new Backoff(0.5, 4.0, () => 0).delay(3), 0);
  const half = new Backoff(0.5, 30, () => 0.5);
  assert.equal(half.delay(2), 1.0);
  assert.equal(half.delay(1000), 15.0);
  assert.throws(() => new Backoff(0, 1), RangeError);
  assert.throws(() => new Backoff(2, 1), RangeError);
});

test("the close-code table covers docs/protocol.md and matches the Python client's", () => {
  const doc = readFileSync(new URL("docs/protocol.md", ROOT), "utf8");
  const table = doc.split("## 15. Close codes")[1].split("\n## ")[0];
  const documented = [...table.matchAll(/^\| (\d{4}) \|/gm)].map((m) => Number(m[1]));
  assert.ok(documented.length > 10);
  for (const code of documented) assert.ok(CLOSE_ACTIONS[code], `close code ${code} has no action`);
  // The Python table (wsd/client/policy.py) is the reference: same codes, same decisions.
  const py = readFileSync(new URL("wsd/client/policy.py", ROOT), "utf8");
  const rows = [...py.matchAll(/^ {4}(\d{4}): CloseAction\((True|False), "[^"]*"(.*)\),$/gm)];
  assert.equal(rows.length, Object.keys(CLOSE_ACTIONS).length);
  for (const [, code, reconnect, rest] of rows) {
    const a = CLOSE_ACTIONS[code];
    assert.equal(a.reconnect, reconnect === "True", `reconnect of ${code}`);
    assert.equal(a.freshToken, rest.includes("fresh_token=True"), `freshToken of ${code}`);
    assert.equal(a.failover, rest.includes("failover=True"), `failover of ${code}`);
    assert.equal(a.penalty, rest.includes("penalty=True"), `penalty of ${code}`);
    assert.equal(a.error, (rest.match(/error="(\w+)"/) || [, ""])[1], `error of ${code}`);
  }
  for (const code of [1000, 1002, 1008, 4000, 4003, 4011]) assert.equal(closeAction(code).reconnect, false, code);
  assert.equal(closeAction(null), CLOSE_ACTIONS[1006]);
  assert.equal(closeAction(4999), UNKNOWN_CLOSE);
  assert.ok(UNKNOWN_CLOSE.reconnect);
});

test("tokenExp reads exp without verifying; null for anything else", () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  assert.equal(tokenExp(`${b64({ alg: "HS256" })}.${b64({ sub: "a", exp: 1764150000 })}.sig`), 1764150000);
  assert.equal(tokenExp(`${b64({})}.${b64({ sub: "a" })}.sig`), null);
  assert.equal(tokenExp("not-a-jwt"), null);
  assert.equal(tokenExp("a.!!!.c"), null);
});

test("options are checked when the client is made", () => {
  const WebSocket = class {};
  assert.throws(() => new WsdClient([], { token: "t", WebSocket }), /at least one URL/);
  assert.throws(() => new WsdClient("ws://x/ws/api", { WebSocket }), /needs a token/);
  assert.throws(() => new WsdClient("ws://x/ws/api", { token: "t", WebSocket, keys: { k: "AAAA" } }),
    /must hold 32 bytes/);
  assert.throws(() => new WsdClient("ws://x/ws/api", { token: "t", WebSocket, keys: { k: "no base64!" } }),
    /not standard base64/);
  assert.throws(() => new WsdClient("ws://x/ws/api", { token: "t", WebSocket: 42 }), /no WebSocket/);
});

// ------------------------------------------------------------------------------------------------ encryption

const KEY = crypto.getRandomValues(new Uint8Array(32));
const OTHER = crypto.getRandomValues(new Uint8Array(32));
const b64url = (bytes) => Buffer.from(bytes).toString("base64url");

/** The frame the daemon sends for an encrypted group: AES-256-GCM, 12-byte IV, the channel name as AAD. */
async function sealed(data, { key = KEY, kid = "2026-12", channel = "trading-signals/acme", aad = channel } = {}) {
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const k = await crypto.subtle.importKey("raw", key, "AES-GCM", false, ["encrypt"]);
  const ct = new Uint8Array(await crypto.subtle.encrypt(
    { name: "AES-GCM", iv, additionalData: new TextEncoder().encode(aad) }, k,
    new TextEncoder().encode(JSON.stringify(data))));
  return {
    type: "message", channel, offset: 42, epoch: "9b1c02aa", msg_type: "trading_signal", priority: "normal",
    ts: 1764150000.123, enc: "A256GCM", data: { kid, iv: b64url(iv), ct: b64url(ct) },
  };
}

test("an A256GCM envelope is decrypted with the key of its kid (Uint8Array or base64 key)", async () => {
  const frame = await sealed({ symbol: "EURUSD", px: 1.0849, note: "é€" });
  for (const key of [KEY, Buffer.from(KEY).toString("base64"), ` ${Buffer.from(KEY).toString("base64")}\n`]) {
    const got = await new Keyring({ "2026-12": key }).open(frame);
    assert.deepEqual(got, { data: { symbol: "EURUSD", px: 1.0849, note: "é€" }, keyId: "2026-12",
      decryptError: null });
  }
  assert.deepEqual(await new Keyring({}).open({ channel: "c", data: { a: 1 } }),
    { data: { a: 1 }, keyId: null, decryptError: null });
});

test("what cannot be decrypted is still handed over, with the envelope and a reason", async () => {
  const ring = new Keyring({ "2026-12": KEY, old: OTHER });
  const frame = await sealed({ n: 1 });
  const noKey = await new Keyring({}).open(frame);
  assert.deepEqual(noKey, { data: frame.data, keyId: "2026-12", decryptError: "no key for kid '2026-12'" });
  const wrongKey = await ring.open(await sealed({ n: 1 }, { key: OTHER }));
  assert.equal(wrongKey.decryptError, "authentication failed");
  // Replayed into another channel instance: the channel is the AAD, so authentication fails.
  const moved = await ring.open({ ...frame, channel: "trading-signals/globex" });
  assert.equal(moved.decryptError, "authentication failed");
  assert.equal(moved.keyId, "2026-12");
  const flipped = { ...frame, data: { ...frame.data, ct: b64url(Buffer.from(frame.data.ct, "base64url").map(
    (b, i) => (i === 0 ? b ^ 1 : b))) } };
  assert.equal((await ring.open(flipped)).decryptError, "authentication failed");
  for (const data of [{ kid: "2026-12" }, { kid: "2026-12", iv: "AAAA", ct: frame.data.ct },
    { kid: "2026-12", iv: frame.data.iv, ct: "AAAA" }, { kid: "2026-12", iv: "!!", ct: frame.data.ct }, "x",
    // base64url without padding, exactly: padding, whitespace or the standard alphabet is malformed (as in Python)
    { kid: "2026-12", iv: `${frame.data.iv}=`, ct: frame.data.ct }, { kid: "2026-12", iv: ` ${frame.data.iv}`,
      ct: frame.data.ct }, { kid: "2026-12", iv: frame.data.iv, ct: `${frame.data.ct}+/` },
    null, { kid: 5, iv: frame.data.iv, ct: frame.data.ct }]) {
    const got = await ring.open({ ...frame, data });
    assert.equal(got.decryptError, "malformed", JSON.stringify(data));
    assert.deepEqual(got.data, data);
  }
  const unknownEnc = await ring.open({ ...frame, enc: "XC20P" });
  assert.equal(unknownEnc.decryptError, "malformed");
  // Authenticated but not JSON: malformed, not a crash.
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const k = await crypto.subtle.importKey("raw", KEY, "AES-GCM", false, ["encrypt"]);
  const ct = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-GCM", iv,
    additionalData: new TextEncoder().encode(frame.channel) }, k, new TextEncoder().encode("{not json")));
  const bad = await ring.open({ ...frame, data: { kid: "2026-12", iv: b64url(iv), ct: b64url(ct) } });
  assert.equal(bad.decryptError, "malformed");
});
