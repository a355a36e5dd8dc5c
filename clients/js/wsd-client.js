// wsd-client.js: a dependency-free JavaScript client for wsd (browsers and Node 20+), an ES module.
//
// It mirrors the Python client (wsd.client, docs/client.md): reconnect with backoff and jitter across several
// URLs, session resume with the client's own positions, re-subscribe from them, `batch` frames unpacked,
// duplicates dropped by (channel, epoch, offset), reliable messages acked once the application took them,
// token refresh before `exp`, the close-code policy, and every hole it cannot fill reported as a Gap.
// Message-level encryption (A256GCM envelopes) is decrypted with WebCrypto. See docs/client-js.md.
//
// Durations are in seconds, as in the Python client.

const EPOCHS_KEPT = 8; // epochs remembered per channel for dedupe
/** The longest `since` query parameter the server takes (docs/protocol.md, "Session resume"). */
export const SINCE_MAX_CHARS = 6144;
export const MODES = Object.freeze(["realtime", "batch", "historical"]);

// ------------------------------------------------------------------------------------------- close-code policy

function action(reconnect, why, { freshToken = false, failover = false, penalty = false, error = "" } = {}) {
  return Object.freeze({ reconnect, why, freshToken, failover, penalty, error });
}

/** The server's close codes (docs/protocol.md, "Close codes") and what the client does about each. */
export const CLOSE_ACTIONS = Object.freeze({
  1000: action(false, "the server ended the session", { error: "closed" }),
  1001: action(true, "server shutting down", { failover: true }),
  1002: action(false, "protocol error", { error: "protocol" }),
  1006: action(true, "connection dropped"),
  1007: action(true, "invalid data"),
  1008: action(false, "policy violation", { error: "protocol" }),
  1009: action(true, "message too big"),
  1011: action(true, "internal error or heartbeat timeout"),
  1013: action(true, "server full, try again later", { failover: true, penalty: true }),
  4000: action(false, "kicked by an operator", { error: "kicked" }),
  4001: action(true, "token expired", { freshToken: true }),
  4003: action(false, "token no longer admitted by this pool", { error: "not_admitted" }),
  4008: action(true, "message rate limit exceeded", { penalty: true }),
  4009: action(true, "slow consumer"),
  4010: action(true, "idle timeout"),
  4011: action(false, "session taken over by another connection", { error: "taken_over" }),
});

/** A code the table does not know: reconnect with backoff (new codes may be added by the server). */
export const UNKNOWN_CLOSE = action(true, "unknown close code");

/** The action for a close code; null/undefined (no close frame: the network dropped) counts as 1006. */
export function closeAction(code) {
  return CLOSE_ACTIONS[code == null ? 1006 : code] || UNKNOWN_CLOSE;
}

/** Exponential backoff with full jitter: attempt n waits random() * min(cap, base * 2**n) seconds. */
export class Backoff {
  constructor(base = 0.5, cap = 30.0, random = Math.random) {
    if (!(base > 0) || !(cap >= base)) {
      throw new RangeError(`backoff needs 0 < base <= cap (got base=${base}, cap=${cap})`);
    }
    this.base = base;
    this.cap = cap;
    this.random = random;
  }

  ceiling(attempt) {
    if (attempt >= 64) return this.cap;
    return Math.min(this.cap, this.base * 2 ** Math.max(0, attempt));
  }

  delay(attempt) {
    return this.random() * this.ceiling(attempt);
  }
}

// ------------------------------------------------------------------------------------------------------ errors

/** The client cannot go on (or a request could not be made). */
export class ClientError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The client was closed: by the application, or by the server with a code that means stop. */
export class ClientClosed extends ClientError {
  constructor(message, code = null, reason = "") {
    super(message);
    this.code = code;
    this.reason = reason;
  }
}

/** An operator closed the connection (4000): the session is over; the client does not reconnect. */
export class Kicked extends ClientClosed {}
/** The pool no longer admits this token (4003 after a refresh). */
export class NotAdmitted extends ClientClosed {}
/** Another connection resumed this client's session (4011): that one won; this client does not reconnect. */
export class TakenOver extends ClientClosed {}

/** The server answered a request with an error reply: `code` and `detail` as in docs/protocol.md. */
export class RequestError extends ClientError {
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.code = code;
    this.detail = detail;
  }
}

/** The connection ended before the reply to a request arrived: the request may or may not have happened. */
export class ConnectionLost extends ClientError {}

const STOPS = { kicked: Kicked, not_admitted: NotAdmitted, taken_over: TakenOver };

// ------------------------------------------------------------------------------------------------------- items

function position(offset, epoch) {
  return Object.freeze({ offset, epoch });
}

function positionFrom(d) {
  if (d === null || typeof d !== "object" || !("offset" in d)) return null;
  return position(Number(d.offset) || 0, String(d.epoch ?? ""));
}

/** One channel message, as the server sent it (`type` is the frame's `msg_type`). */
export class Message {
  constructor(fields) {
    Object.assign(this, fields);
    Object.freeze(this);
  }

  get kind() {
    return "message";
  }

  get position() {
    return position(this.offset, this.epoch);
  }
}

/** A hole: messages after `last` and before `resumed` may be missing (either may be null). */
export class Gap {
  constructor(channel, last, resumed, reason) {
    this.channel = channel;
    this.last = last;
    this.resumed = resumed;
    this.reason = reason;
    Object.freeze(this);
  }

  get kind() {
    return "gap";
  }
}

/** One `history` reply; iterable over `messages`. */
export class History {
  constructor(fields) {
    Object.assign(this, fields);
    Object.freeze(this);
  }

  get length() {
    return this.messages.length;
  }

  [Symbol.iterator]() {
    return this.messages[Symbol.iterator]();
  }
}

// --------------------------------------------------------------------------------------------- encoding helpers

const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder("utf-8", { fatal: true });

function bytesToBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function base64ToBytes(text, url) {
  // base64url (envelopes, JWTs) is taken exactly as the daemon writes it: no padding, no whitespace
  let t = url ? String(text) : String(text).trim();
  if (url) {
    if (/[^A-Za-z0-9_-]/.test(t)) throw new TypeError("not base64url");
    t = t.replace(/-/g, "+").replace(/_/g, "/");
  } else if (/[^A-Za-z0-9+/=]/.test(t)) {
    throw new TypeError("not base64");
  }
  while (t.length % 4) t += "=";
  const bin = atob(t);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function base64url(bytes) {
  return bytesToBase64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The `exp` claim of a JWT, read without verifying it (the server verifies); null if absent. */
export function tokenExp(token) {
  try {
    const payload = JSON.parse(utf8Strict.decode(base64ToBytes(String(token).split(".")[1] ?? "", true)));
    return typeof payload?.exp === "number" ? payload.exp : null;
  } catch {
    return null;
  }
}

function keyBytes(kid, value) {
  let bytes;
  if (typeof value === "string") {
    try {
      bytes = base64ToBytes(value, false);
    } catch {
      throw new TypeError(`keys["${kid}"] is not standard base64`);
    }
  } else if (value instanceof Uint8Array) {
    bytes = value;
  } else if (value instanceof ArrayBuffer) {
    bytes = new Uint8Array(value);
  } else {
    throw new TypeError(`keys["${kid}"] must be a Uint8Array, an ArrayBuffer or a base64 string`);
  }
  if (bytes.length !== 32) throw new TypeError(`keys["${kid}"] must hold 32 bytes (AES-256), not ${bytes.length}`);
  return Uint8Array.from(bytes);
}

function isObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

// ---------------------------------------------------------------- decryption (docs/client-js.md, "Encrypted messages")

/**
 * The application's decryption keys (kid -> 32 bytes, as a Uint8Array, an ArrayBuffer or standard base64) and
 * the A256GCM envelope opener: AES-256-GCM, a 12-byte IV, ciphertext||16-byte tag, the channel name as AAD.
 */
export class Keyring {
  constructor(keys = {}) {
    this._keys = new Map();
    for (const [kid, value] of Object.entries(keys)) this._keys.set(kid, keyBytes(kid, value));
    this._cryptoKeys = new Map();
  }

  _cryptoKey(kid) {
    let key = this._cryptoKeys.get(kid);
    if (!key) {
      key = globalThis.crypto.subtle.importKey("raw", this._keys.get(kid), { name: "AES-GCM" }, false, ["decrypt"]);
      this._cryptoKeys.set(kid, key);
    }
    return key;
  }

  /** {data, keyId, decryptError} of a message frame: the plaintext of an encrypted one, or why not. */
  async open(frame) {
    if (frame.enc == null) return { data: frame.data, keyId: null, decryptError: null };
    const env = frame.data;
    const kid = isObject(env) && typeof env.kid === "string" ? env.kid : null;
    const fail = (decryptError) => ({ data: env, keyId: kid, decryptError });
    if (frame.enc !== "A256GCM" || kid == null || typeof env.iv !== "string" || typeof env.ct !== "string") {
      return fail("malformed");
    }
    if (!this._keys.has(kid)) return fail(`no key for kid '${kid.slice(0, 64)}'`);
    if (!globalThis.crypto?.subtle) return fail("WebCrypto unavailable (crypto.subtle needs a secure context)");
    let iv;
    let ct;
    try {
      iv = base64ToBytes(env.iv, true);
      ct = base64ToBytes(env.ct, true);
    } catch {
      return fail("malformed");
    }
    if (iv.length !== 12 || ct.length < 16) return fail("malformed");
    let plain;
    try {
      plain = await globalThis.crypto.subtle.decrypt(
        { name: "AES-GCM", iv, additionalData: utf8.encode(String(frame.channel ?? "")), tagLength: 128 },
        await this._cryptoKey(kid), ct);
    } catch {
      return fail("authentication failed");
    }
    try {
      return { data: JSON.parse(utf8Strict.decode(plain)), keyId: kid, decryptError: null };
    } catch {
      return fail("malformed");
    }
  }
}

// ------------------------------------------------------------------------------------------------- plumbing

/** An unbounded async queue: push() never waits; shift() waits for an item. */
class AsyncQueue {
  constructor() {
    this.items = [];
    this.waiters = [];
  }

  push(item) {
    const w = this.waiters.shift();
    if (w) w(item);
    else this.items.push(item);
  }

  shift() {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  get size() {
    return this.items.length;
  }
}

function seconds(s) {
  return Math.min(2 ** 31 - 1, Math.max(0, s * 1000));
}

function defaultSleep(s) {
  return new Promise((resolve) => setTimeout(resolve, seconds(s)));
}

function withTimeout(promise, s, onTimeout) {
  if (s == null) return promise;
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(onTimeout()), seconds(s));
    }),
  ]).finally(() => clearTimeout(timer));
}

function report(what, err) {
  // The application's callbacks must not stop the client: say so on the console, never with a token in it.
  if (typeof console !== "undefined") console.error(`wsd-client: ${what} failed:`, err);
}

// ------------------------------------------------------------------------------------------------ subscription

/**
 * One channel subscription. Iterate it (`for await (const item of sub)`) for Message and Gap items in order,
 * or register `sub.on("message", fn)` / `sub.on("gap", fn)` to have them pushed (a page's usual way).
 */
export class Subscription {
  constructor(client, channel, historySpec, mode, types) {
    this._client = client;
    this.requested = channel;
    this.channel = ""; // the full instance name, from the server's reply
    this.mode = mode;
    this.types = types;
    this.historySpec = historySpec;
    this.processed = null; // the last message the application took
    this.baseline = null; // the channel's position when subscribed without history
    this.result = {};
    this.duplicatesDropped = 0;
    this.gaps = 0;
    this.error = null; // why it ended, when the server or a refusal ended it
    this._seen = new Map(); // epoch -> highest offset received
    this._last = null; // the last position handed to the queue
    this._reset = false; // a hole was already reported: the next message starts afresh
    this._pendingGap = null; // [reason, last]
    this._filledOnResume = false;
    this._queue = [];
    this._waiters = [];
    this._listeners = { message: [], gap: [], end: [] };
    this._ended = false;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** The next item ({value, done}); rejects with the error that stopped the client, if any. */
  next() {
    if (this._queue.length) return Promise.resolve(this._take(this._queue.shift()));
    if (this._ended) return this.error ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /** Leaving a `for await` loop: the subscription goes on (unsubscribe() stops it). */
  return() {
    return Promise.resolve({ value: undefined, done: true });
  }

  /**
   * `on("message" | "gap" | "end", fn)`: with a "message" listener the items are pushed to the listeners as
   * they come (and count as taken once the listener returns) instead of waiting for the iterator.
   * Returns a function that removes the listener.
   */
  on(event, fn) {
    const list = this._listeners[event];
    if (!list) throw new TypeError(`unknown event ${JSON.stringify(event)} (message, gap, end)`);
    list.push(fn);
    if (event === "message") {
      while (this._queue.length) this._dispatch(this._queue.shift());
    }
    if (event === "end" && this._ended && !this._queue.length) this._call(fn, this.error, "end listener");
    return () => {
      const i = list.indexOf(fn);
      if (i >= 0) list.splice(i, 1);
    };
  }

  /** Items received and not yet taken by the application. */
  pending() {
    return this._queue.length;
  }

  /** Stop this subscription; its iterator ends after what was already received. */
  unsubscribe() {
    return this._client._unsubscribe(this);
  }

  _take([item, session]) {
    if (item instanceof Message) {
      this.processed = item.position;
      if (item.seq != null) this._client._ack(item.seq, session);
    }
    return { value: item, done: false };
  }

  /** Call a listener: true, false when it threw, or for an async one a promise of that (a rejection is reported
   * like a throw, never left unhandled: Node would stop the process for it). */
  _call(fn, arg, what) {
    let got;
    try {
      got = fn(arg);
    } catch (err) {
      report(what, err);
      return false;
    }
    if (got == null || typeof got.then !== "function") return true;
    return Promise.resolve(got).then(() => true, (err) => {
      report(what, err);
      return false;
    });
  }

  _dispatch([item, session]) {
    let ok = true;
    const waiting = [];
    for (const fn of this._listeners[item.kind].slice()) {
      const r = this._call(fn, item, `${item.kind} listener`);
      if (r === false) ok = false;
      else if (r !== true) waiting.push(r);
    }
    if (item instanceof Message) {
      this.processed = item.position;
      if (item.seq == null || !ok) return; // not acked when a listener threw
      if (!waiting.length) this._client._ack(item.seq, session);
      else Promise.all(waiting).then((oks) => oks.every(Boolean) && this._client._ack(item.seq, session));
    }
  }

  _put(item, session) {
    const entry = [item, session];
    if (this._listeners.message.length) this._dispatch(entry);
    else if (this._waiters.length) this._waiters.shift().resolve(this._take(entry));
    else this._queue.push(entry);
  }

  _finish(err) {
    if (this._ended) return;
    this._ended = true;
    this.error = err || null;
    for (const w of this._waiters.splice(0)) {
      if (err) w.reject(err);
      else w.resolve({ value: undefined, done: true });
    }
    for (const fn of this._listeners.end.slice()) this._call(fn, this.error, "end listener");
  }
}

// ------------------------------------------------------------------------------------------------------ client

/** One open connection: its socket, session, in-flight requests and the frames waiting to be processed. */
class Conn {
  constructor(ws, session) {
    this.ws = ws;
    this.session = session;
    this.pending = new Map();
    this.frames = new AsyncQueue();
    this.lost = false;
    this.timers = new Set();
  }
}

/** A wsd client over one or more URLs of the same pool (see docs/client-js.md). */
export class WsdClient {
  constructor(urls, options = {}) {
    this.urls = typeof urls === "string" ? [urls] : Array.from(urls || []);
    if (!this.urls.length) throw new TypeError("WsdClient needs at least one URL");
    const o = options;
    if (typeof o.token !== "string" && typeof o.token !== "function") {
      throw new TypeError("WsdClient needs a token: a JWT string or a function returning one");
    }
    this._tokenSource = o.token;
    this.backoff = new Backoff(o.backoffBase ?? 0.5, o.backoffCap ?? 30.0, o.random ?? Math.random);
    this._sleep = o.sleep ?? defaultSleep;
    this.refreshBefore = o.refreshBefore === undefined ? 30.0 : o.refreshBefore;
    this.openTimeout = o.openTimeout ?? 10.0;
    this.requestTimeout = o.requestTimeout ?? 10.0;
    this.connectTimeout = o.connectTimeout ?? null;
    this.fillGaps = o.fillGaps ?? true;
    this.pingInterval = o.pingInterval === undefined ? 20.0 : o.pingInterval;
    this.pingTimeout = o.pingTimeout === undefined ? 20.0 : o.pingTimeout;
    this.onState = o.onState ?? null;
    this.onOther = o.onOther ?? null;
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass the WebSocket option (Node 20: run with --experimental-websocket, "
        + "or give the constructor of the `ws` package)");
    }
    this._keyring = new Keyring(o.keys ?? {});
    this.historyFills = 0; // `history since` requests made to fill holes
    this.othersDropped = 0; // messages outside any subscription, with no onOther to take them
    this.state = "closed";
    this.sessionId = null;
    this.url = null;
    this.error = null; // why the client stopped, if not closed by the application
    this.welcome = {};
    this.connections = 0; // welcomes received
    this.duplicatesDropped = 0;
    this.gaps = 0;
    this._token = typeof o.token === "string" ? o.token : null;
    this._tokenExp = typeof o.token === "string" ? tokenExp(o.token) : null;
    this._subs = [];
    this._channels = new Map();
    this._conn = null;
    this._run = null;
    this._closing = false;
    this._stopped = false;
    this._ids = 1;
    this._attempt = 0;
    this._sentSince = new Set(); // channels whose position the last resume attempt told the server
    this._watchers = new Set(); // wake-ups on open / stop
    this._wake = null; // ends the backoff sleep early (close)
    this._closed = new Promise((resolve) => { this._signalClose = resolve; }); // settles at close()
    this._abort = null; // ends the connection attempt in flight (close)
  }

  /** Per subscribed channel, the position of the last message the application took. */
  get positions() {
    const out = {};
    for (const sub of this._subs) if (sub.processed) out[sub.channel] = sub.processed;
    return out;
  }

  // ----------------------------------------------------------------------------------------------- lifecycle

  /** Connect (trying the URLs in turn, with backoff); resolves once the first welcome arrived. */
  async start() {
    if (this._run) throw new ClientError("client already started");
    this._run = this._loop();
    const opened = await this._waitOpen(this.connectTimeout);
    if (opened) return this;
    if (this._stopped) throw this.error || new ClientClosed("the client stopped before connecting");
    await this.close();
    throw new ClientError(`not connected within ${this.connectTimeout}s`);
  }

  /** Close with 1000 (the session ends); subscriptions end after what they hold. */
  async close() {
    this._closing = true;
    this._signalClose();
    const conn = this._conn;
    if (conn) this._lose(conn, 1000, "closed by the application");
    if (this._abort) this._abort(1000, "closed by the application"); // a connection attempt in flight
    if (this._wake) this._wake();
    if (this._run) await this._run;
    this._finish(null);
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    if (this.onState) {
      try {
        this.onState(state);
      } catch (err) {
        report("onState", err);
      }
    }
    for (const w of this._watchers) w();
  }

  _finish(err) {
    if (!this.error && err) this.error = err;
    this._stopped = true;
    this._setState("closed");
    for (const sub of this._subs) sub._finish(err);
    for (const w of this._watchers) w();
  }

  /** Wait until a connection is open (true) or the client stopped / the time ran out (false). */
  _waitOpen(timeout) {
    const ready = () => this._conn && !this._conn.lost && this.state === "open";
    if (ready()) return Promise.resolve(true);
    if (this._stopped) return Promise.resolve(false);
    return new Promise((resolve) => {
      let timer = null;
      const w = () => {
        if (ready() || this._stopped) done(ready());
      };
      const done = (v) => {
        this._watchers.delete(w);
        if (timer) clearTimeout(timer);
        resolve(v);
      };
      this._watchers.add(w);
      if (timeout != null) timer = setTimeout(() => done(ready()), seconds(timeout));
    });
  }

  // -------------------------------------------------------------------------------------------------- tokens

  async _fetchToken() {
    const got = await this._tokenSource();
    if (typeof got !== "string" || !got) throw new ClientError("the token function did not return a token string");
    return got;
  }

  async _tokenFor(fresh) {
    if (typeof this._tokenSource === "string") {
      if (fresh) throw new ClientClosed("the token expired and no token function was given", 4001);
      return this._tokenSource;
    }
    const stale = this._tokenExp != null && this._tokenExp <= Date.now() / 1000 + 1;
    if (fresh || this._token == null || stale) {
      this._token = await this._fetchToken();
      this._tokenExp = tokenExp(this._token);
    }
    return this._token;
  }

  // ------------------------------------------------------------------------------------------ reconnect loop

  _target(url) {
    if (this.sessionId == null) return url;
    const u = new URL(url);
    u.searchParams.delete("session");
    u.searchParams.delete("since");
    u.searchParams.set("session", this.sessionId);
    const since = this._resumePositions();
    this._sentSince = new Set(Object.keys(since));
    if (this._sentSince.size) {
      // What this client really has, per channel: the server replays from here, not from what it wrote.
      const blob = {};
      for (const [ch, p] of Object.entries(since)) blob[ch] = [p.offset, p.epoch];
      const text = base64url(utf8.encode(JSON.stringify(blob)));
      if (text.length <= SINCE_MAX_CHARS) u.searchParams.set("since", text);
      else this._sentSince = new Set(); // too long: the server replays from what it wrote, the fill does the rest
    }
    return u.toString();
  }

  /** Per live subscription, the last message received (handed to the subscription, so kept). */
  _resumePositions() {
    const out = {};
    for (const sub of this._subs) {
      if (sub.channel && sub._last && sub._last.epoch && sub.mode !== "historical") out[sub.channel] = sub._last;
    }
    return out;
  }

  async _loop() {
    let idx = 0;
    let penalty = 0;
    let fresh = false;
    try {
      while (!this._closing) {
        const url = this.urls[idx];
        this._setState("connecting");
        // A token function may never settle: close() must not wait for it (nor start() with connectTimeout).
        const asked = this._tokenFor(fresh);
        asked.catch(() => {}); // what it throws after close() is of no interest
        const token = await Promise.race([asked, this._closed]);
        fresh = false;
        if (this._closing) break;
        const { welcomed, code, reason } = await this._serve(url, token);
        if (this._closing) break;
        let advance = false;
        if (!welcomed && (code == null || code === 1006 || code === 1005)) {
          // Could not connect (refused, unreachable, timed out, a refused handshake: browsers say 1006 for all).
          advance = true;
        } else {
          const act = closeAction(code);
          if (!act.reconnect) {
            const Kind = STOPS[act.error] || ClientClosed;
            throw new Kind(`closed by the server with ${code} (${act.why}): ${reason}`, code, reason);
          }
          this._setState("connecting");
          fresh = act.freshToken;
          advance = act.failover;
          penalty = act.penalty ? penalty + 1 : 0;
        }
        if (advance) idx = (idx + 1) % this.urls.length;
        const delay = this.backoff.delay(this._attempt + penalty);
        this._attempt += 1;
        await this._backoffSleep(delay);
      }
      this._finish(null);
    } catch (err) {
      this._finish(err instanceof ClientClosed ? err : Object.assign(
        new ClientError(`client stopped: ${err?.message ?? err}`), { cause: err }));
    }
  }

  _backoffSleep(s) {
    let timer = null;
    return new Promise((resolve) => {
      this._wake = resolve;
      // The default sleep's timer is ours to cancel: after close() it must not keep Node running until it fires.
      if (this._sleep === defaultSleep) timer = setTimeout(resolve, seconds(s));
      else Promise.resolve(this._sleep(s)).then(resolve, resolve);
    }).finally(() => {
      if (timer) clearTimeout(timer);
      this._wake = null;
    });
  }

  /** Run one connection until it closes: {welcomed, code, reason}. */
  _serve(url, token) {
    return new Promise((resolve) => {
      let ws;
      try {
        ws = new this._WebSocket(this._target(url), ["wsd.v1", `bearer.${token}`]);
      } catch {
        resolve({ welcomed: false, code: 1006, reason: "invalid URL" });
        return;
      }
      let conn = null;
      let done = false;
      let processing = Promise.resolve();
      const openTimer = setTimeout(() => {
        finish(1006, "no welcome within openTimeout");
      }, seconds(this.openTimeout));
      const finish = (code, reason) => {
        if (done) return;
        done = true;
        this._abort = null;
        clearTimeout(openTimer);
        detach();
        try {
          ws.close(code === 1000 ? 1000 : undefined);
        } catch { /* already closing */ }
        if (conn) {
          this._lose(conn, code, reason);
          processing.then(() => resolve({ welcomed: true, code, reason }));
        } else {
          resolve({ welcomed: false, code, reason });
        }
      };
      const onMessage = (ev) => {
        if (typeof ev.data !== "string") return; // wsd sends text frames only
        let frame;
        try {
          frame = JSON.parse(ev.data);
        } catch {
          return;
        }
        if (!isObject(frame)) return;
        if (conn) {
          this._dispatch(conn, frame);
          return;
        }
        if (frame.type !== "welcome" || typeof frame.session_id !== "string") {
          finish(1006, "no welcome frame");
          return;
        }
        clearTimeout(openTimer);
        this.welcome = frame;
        this.sessionId = frame.session_id;
        this.url = url;
        this.connections += 1;
        this._attempt = 0;
        if (typeof frame.exp === "number") this._tokenExp = frame.exp;
        conn = new Conn(ws, this.sessionId);
        conn.finish = finish;
        this._conn = conn;
        processing = this._process(conn, frame);
        if (typeof this._tokenSource !== "string" && this.refreshBefore != null) this._scheduleRefresh(conn);
        if (this.pingInterval != null) this._schedulePing(conn);
        this._setState("open");
      };
      const onClose = (ev) => finish(ev.code, ev.reason || "");
      const onError = () => {
        // Browsers follow an error with a close event; Node 20's WebSocket does not when it cannot connect.
        if (!conn) finish(1006, "could not connect");
        else setTimeout(() => finish(1006, "connection error"), 1000);
      };
      const detach = () => {
        ws.removeEventListener("message", onMessage);
        ws.removeEventListener("close", onClose);
        ws.removeEventListener("error", onError);
      };
      ws.addEventListener("message", onMessage);
      ws.addEventListener("close", onClose);
      ws.addEventListener("error", onError);
      this._abort = finish;
      if (this._closing) finish(1000, "closed by the application");
    });
  }

  /** The connection is over (closed, dropped, or declared dead): fail its requests, stop its timers. */
  _lose(conn, code, reason) {
    if (conn.lost) return;
    conn.lost = true;
    if (this._conn === conn) this._conn = null;
    for (const t of conn.timers) clearTimeout(t);
    conn.timers.clear();
    for (const { reject } of conn.pending.values()) reject(new ConnectionLost("the connection closed before the reply"));
    conn.pending.clear();
    conn.frames.push(null);
    if (conn.finish) conn.finish(code, reason);
    if (this.state === "open" && !this._closing) this._setState("connecting");
  }

  _dispatch(conn, frame) {
    if ("ok" in frame && !("type" in frame)) {
      const entry = conn.pending.get(frame.id);
      if (entry) {
        conn.pending.delete(frame.id);
        if (entry.event != null) conn.frames.push(["reply", entry.event, frame]); // in order with what follows
        entry.resolve(frame);
      }
      return;
    }
    conn.frames.push(["frame", null, frame]);
  }

  _timer(conn, s, fn) {
    if (conn.lost) return;
    const t = setTimeout(() => {
      conn.timers.delete(t);
      if (!conn.lost) fn();
    }, seconds(s));
    conn.timers.add(t);
  }

  _schedulePing(conn) {
    // Browsers answer the server's pings but cannot send their own: an application ping that stays unanswered
    // means a network that drops packets without closing, or a frozen peer: give the connection up and resume.
    this._timer(conn, this.pingInterval, async () => {
      try {
        await this._request(conn, { op: "ping" }, null, this.pingTimeout);
      } catch (err) {
        if (err instanceof ConnectionLost || err instanceof RequestError) return;
        this._lose(conn, 1006, "ping timeout");
        return;
      }
      this._schedulePing(conn);
    });
  }

  // ------------------------------------------------------------------------------------------------ requests

  /** Send a request on `conn` and return its result; RequestError for an error reply. */
  async _request(conn, frame, event = null, timeout = this.requestTimeout) {
    if (conn.lost) throw new ConnectionLost("the connection closed");
    const id = this._ids++;
    const reply = new Promise((resolve, reject) => conn.pending.set(id, { resolve, reject, event }));
    try {
      conn.ws.send(JSON.stringify({ ...frame, id }));
    } catch {
      conn.pending.delete(id);
      throw new ConnectionLost("the connection closed before the request was sent");
    }
    const got = await withTimeout(reply, timeout, () => {
      conn.pending.delete(id);
      return new ClientError(`no reply to ${frame.op} within ${timeout}s`);
    });
    if (!got.ok) {
      const err = isObject(got.error) ? got.error : {};
      throw new RequestError(String(err.code ?? "unknown"), String(err.message ?? ""));
    }
    return isObject(got.result) ? got.result : {};
  }

  /** The open connection, waiting for one (up to requestTimeout) while reconnecting. */
  async _current() {
    if (this._stopped || !this._run) throw this.error || new ClientClosed("the client is closed");
    if (!(await this._waitOpen(this.requestTimeout))) {
      if (this._stopped) throw this.error || new ClientClosed("the client is closed");
      throw new ClientError(`not connected within ${this.requestTimeout}s`);
    }
    return this._conn;
  }

  /** A request that is safe to send again on the next connection if this one is lost. */
  async _idempotent(frame, event = null) {
    for (;;) {
      const conn = await this._current();
      try {
        return await this._request(conn, frame, event);
      } catch (err) {
        if (!(err instanceof ConnectionLost)) throw err;
      }
    }
  }

  _ack(seq, session) {
    const conn = this._conn;
    if (!conn || conn.lost || conn.session !== session) return; // a new session: the server no longer waits
    try {
      conn.ws.send(JSON.stringify({ op: "ack", seq }));
    } catch { /* closing: the server resends it after the resume */ }
  }

  // ----------------------------------------------------------------------------------------- public operations

  /**
   * Subscribe to a channel group (or a full instance name).
   * Options: history (a number, or {limit} / {since}), since ({offset, epoch}), mode, types.
   */
  async subscribe(channel, { history = null, since = null, mode = null, types = null } = {}) {
    if (mode != null && !MODES.includes(mode)) {
      throw new RangeError(`mode must be one of ${MODES.join(", ")} (on_demand needs pull, which this client `
        + `does not offer), not ${JSON.stringify(mode)}`);
    }
    let spec;
    if (typeof history === "number") spec = { limit: history };
    else if (isObject(history)) spec = { ...history };
    else if (history == null) spec = null;
    else throw new TypeError("history must be a number of messages or an object like {limit: N} / {since: ...}");
    if (since != null) spec = { ...(spec || {}), since: { offset: since.offset, epoch: since.epoch } };
    const sub = new Subscription(this, channel, spec, mode, types != null ? Array.from(types) : null);
    if (spec && spec.since) sub._last = positionFrom(spec.since);
    const res = await this._idempotent(this._subscribeFrame(sub, spec), ["subscribed", sub, spec]);
    this._register(sub, res); // also done in order by the processing loop; whichever runs first
    return sub;
  }

  _register(sub, res) {
    if (sub._ended) return;
    sub.result = res;
    sub.channel = String(res.channel || sub.requested);
    const old = this._channels.get(sub.channel);
    if (old && old !== sub) this._drop(old, null); // subscribing again replaces the subscription (as on the server)
    this._channels.set(sub.channel, sub);
    if (!this._subs.includes(sub)) this._subs.push(sub);
  }

  _subscribeFrame(sub, history) {
    const frame = { op: "subscribe", channel: sub.channel || sub.requested };
    if (sub.mode != null) frame.mode = sub.mode;
    if (history != null) frame.history = history;
    if (sub.types != null) frame.filter = { types: sub.types };
    return frame;
  }

  async _unsubscribe(sub) {
    const i = this._subs.indexOf(sub);
    if (i >= 0) this._subs.splice(i, 1);
    if (this._channels.get(sub.channel) === sub) this._channels.delete(sub.channel);
    sub._finish(null);
    try {
      await this._idempotent({ op: "unsubscribe", channel: sub.channel || sub.requested });
    } catch (err) {
      if (!(err instanceof RequestError)) throw err;
    }
  }

  /**
   * Publish; the server's result (id, channel, offset, epoch, delivered). Not sent again on a new connection:
   * ConnectionLost means it may or may not have been published.
   */
  async publish(channel, data, { type = null, priority = null, ttl = null } = {}) {
    const frame = { op: "publish", channel, data };
    if (type != null) frame.type = type;
    if (priority != null) frame.priority = priority;
    if (ttl != null) frame.ttl = ttl;
    return this._request(await this._current(), frame);
  }

  /** One page of a channel's history (oldest first); `more` / `next` say if there is another. */
  async history(channel, { limit = null, since = null } = {}) {
    const frame = { op: "history", channel };
    if (limit != null) frame.limit = limit;
    if (since != null) frame.since = { offset: since.offset, epoch: since.epoch };
    return this._history(await this._idempotent(frame));
  }

  /** An application-level ping: the server's wall clock (Unix seconds). */
  async ping() {
    return Number((await this._idempotent({ op: "ping" })).pong ?? 0);
  }

  // ------------------------------------------------------------------------------------------- token refresh

  _scheduleRefresh(conn) {
    const exp = this._tokenExp;
    if (exp == null) return;
    const now = Date.now() / 1000;
    const lead = Math.min(this.refreshBefore, Math.max(0, exp - now) / 2);
    this._timer(conn, Math.max(0, exp - lead - now), async () => {
      let token;
      try {
        token = await this._fetchToken();
      } catch {
        return; // at exp the server closes with 4001; the reconnect asks again
      }
      const newExp = tokenExp(token);
      if (newExp == null || newExp <= exp) return; // nothing better: at exp 4001 follows, and a fresh reconnect
      let result;
      try {
        result = await this._request(conn, { op: "refresh", token });
      } catch {
        return; // 4003 or 4001 follows; the reconnect loop handles it
      }
      this._token = token;
      this._tokenExp = typeof result.exp === "number" ? result.exp : newExp;
      this._scheduleRefresh(conn);
    });
  }

  async _message(frame) {
    const { data, keyId, decryptError } = await this._keyring.open(frame);
    const seq = frame.seq;
    return new Message({
      channel: String(frame.channel || ""), offset: Number(frame.offset) || 0, epoch: String(frame.epoch || ""),
      type: String(frame.msg_type || "message"), data, priority: String(frame.priority || "normal"),
      ts: Number(frame.ts) || 0, seq: seq != null ? Number(seq) : null, history: Boolean(frame.history),
      keyId, decryptError,
    });
  }

  async _history(res) {
    const messages = [];
    for (const f of res.messages || []) if (isObject(f)) messages.push(await this._message(f));
    return new History({
      channel: String(res.channel ?? ""), messages, recovered: res.recovered !== false,
      position: positionFrom(res.position) || position(0, ""), more: Boolean(res.more), next: positionFrom(res.next),
    });
  }

  // --------------------------------------------------------------------------- processing (one loop per connection)

  async _process(conn, hello) {
    try {
      await this._afterWelcome(conn, hello);
      for (;;) {
        if (conn.frames.size === 0) this._flushPendingGaps(conn);
        const entry = await conn.frames.shift();
        if (entry === null) return;
        const [kind, event, frame] = entry;
        if (kind === "reply") {
          this._onSubscribed(conn, event, frame);
          continue;
        }
        const t = frame.type;
        if (t === "message") await this._onMessage(conn, frame);
        else if (t === "batch") {
          for (const m of Array.isArray(frame.messages) ? frame.messages : []) {
            if (isObject(m) && m.type === "message") await this._onMessage(conn, m);
          }
        } else if (t === "recovery") this._onRecovery(frame);
        else if (t === "unsubscribed") this._onUnsubscribed(frame);
      }
    } catch (err) {
      if (err instanceof ConnectionLost) return; // what was left is fetched again after the reconnect
      if (err instanceof ClientError) {
        // a history fill that got no reply: give this connection up, the resume fetches it again
        this._lose(conn, 1006, err.message);
        return;
      }
      report("processing a frame", err);
      this._lose(conn, 1006, "client error");
    }
  }

  async _afterWelcome(conn, hello) {
    const restored = new Set(hello.resumed && Array.isArray(hello.subscriptions) ? hello.subscriptions : []);
    for (const sub of this._subs.slice()) {
      sub._filledOnResume = false;
      if (restored.has(sub.channel)) {
        // An older server replays from what it wrote; what it wrote into the dying socket is fetched here.
        // Not needed when the server was told the position: its replay starts there.
        if (this.fillGaps && sub._last && sub.mode !== "historical" && !this._sentSince.has(sub.channel)) {
          await this._fill(conn, sub, sub._last);
          sub._filledOnResume = true;
        }
        continue;
      }
      if (sub.mode === "historical") continue; // nothing live to resume
      // What was received is in the subscription or was taken: ask for what came after it.
      const pos = sub._last || sub.processed || sub.baseline;
      const spec = pos ? { since: { offset: pos.offset, epoch: pos.epoch } } : sub.historySpec;
      try {
        await this._request(conn, this._subscribeFrame(sub, spec), ["subscribed", sub, spec]);
      } catch (err) {
        if (!(err instanceof RequestError)) throw err;
        this._drop(sub, err); // e.g. the new token no longer allows it
      }
    }
  }

  _onSubscribed(conn, event, frame) {
    const [, sub, spec] = event;
    if (!frame.ok || sub._ended) return;
    const res = isObject(frame.result) ? frame.result : {};
    this._register(sub, res);
    const pos = positionFrom(res.position);
    const since = positionFrom(spec?.since);
    if (since && res.recovered === false && since.offset > 0) {
      const reason = `subscribe since offset ${since.offset} of epoch ${since.epoch}: recovered:false`;
      this._hole(conn, sub, reason, since, Boolean(res.history));
    } else if (spec == null && sub._last == null && sub.mode !== "historical") {
      sub._last = sub.baseline = pos; // live only: continuity is checked from here
    }
  }

  _onRecovery(frame) {
    const sub = this._channels.get(String(frame.channel));
    const live = "since" in frame; // pushed on a live subscription: the server's bus between nodes missed messages
    if (!sub || (sub._filledOnResume && !live) || frame.recovered !== false) return;
    if (!sub._last || sub._last.offset === 0) return; // nothing received yet: nothing can be missing before it
    sub._pendingGap = [live
      ? "the server missed messages between its nodes that its history no longer holds (recovered:false)"
      : "resume could not replay every missed message (recovered:false)", sub._last];
    sub._reset = true; // the hole is reported: the next message is not checked against the position before it
  }

  _onUnsubscribed(frame) {
    const sub = this._channels.get(String(frame.channel));
    if (sub) this._drop(sub, new RequestError(String(frame.reason ?? "forbidden"), String(frame.message ?? "")));
  }

  _drop(sub, err) {
    const i = this._subs.indexOf(sub);
    if (i >= 0) this._subs.splice(i, 1);
    if (this._channels.get(sub.channel) === sub) this._channels.delete(sub.channel);
    sub._finish(err);
  }

  /** Report a hole now, or when the next message shows where delivery resumed. */
  _hole(conn, sub, reason, last, pending, resumed = null) {
    if (pending) sub._pendingGap = [reason, last];
    else this._emitGap(conn, sub, new Gap(sub.channel, last, resumed, reason));
    sub._reset = true;
  }

  _emitGap(conn, sub, gap) {
    sub.gaps += 1;
    this.gaps += 1;
    sub._put(gap, conn.session);
  }

  _flushPendingGaps(conn) {
    for (const sub of this._subs) {
      if (sub._pendingGap) {
        const [reason, last] = sub._pendingGap;
        sub._pendingGap = null;
        this._emitGap(conn, sub, new Gap(sub.channel, last, null, reason));
      }
    }
  }

  _isDuplicate(sub, m) {
    const top = sub._seen.get(m.epoch);
    return top !== undefined && m.offset <= top;
  }

  _deliver(conn, sub, m) {
    if (sub._pendingGap) {
      const [reason, last] = sub._pendingGap;
      sub._pendingGap = null;
      this._emitGap(conn, sub, new Gap(sub.channel, last, m.position, reason));
    }
    const seen = sub._seen;
    if (!seen.has(m.epoch) && seen.size >= EPOCHS_KEPT) seen.delete(seen.keys().next().value);
    seen.set(m.epoch, Math.max(seen.get(m.epoch) ?? 0, m.offset));
    sub._last = m.position;
    sub._reset = false;
    sub._put(m, conn.session);
  }

  async _onMessage(conn, frame) {
    const m = await this._message(frame);
    const sub = m.channel ? this._channels.get(m.channel) : undefined;
    if (!sub || sub._ended) {
      // Not a channel this client subscribed to: `wsctl send`, a pool's default subscription, a rule's target.
      if (!this.onOther) {
        this.othersDropped += 1;
        return;
      }
      try {
        await this.onOther(m);
      } catch (err) {
        report("onOther (the message is not acked)", err);
        return;
      }
      if (m.seq != null) this._ack(m.seq, conn.session);
      return;
    }
    if (this._isDuplicate(sub, m)) {
      sub.duplicatesDropped += 1;
      this.duplicatesDropped += 1;
      const done = sub.processed;
      if (m.seq != null && done && done.epoch === m.epoch && m.offset <= done.offset) {
        this._ack(m.seq, conn.session); // already taken: the server resent it
      }
      return;
    }
    let last = sub._last;
    if (last && last.offset === 0 && last.epoch !== m.epoch) {
      // A position taken before the channel's first message names the epoch new instances would start in,
      // which may have moved on: nothing of that epoch was missed; check the offsets of the new one.
      last = position(0, m.epoch);
    }
    if (!sub._pendingGap && !sub._reset && last) {
      if (m.epoch !== last.epoch) {
        this._emitGap(conn, sub, new Gap(sub.channel, last, m.position,
          `epoch changed from ${last.epoch} to ${m.epoch}: the channel's history was lost`));
      } else if (m.offset > last.offset + 1 && sub.mode !== "historical") {
        if (!this.fillGaps) {
          this._emitGap(conn, sub, new Gap(sub.channel, last, m.position,
            `offsets ${last.offset + 1} to ${m.offset - 1} were not received (not checked: fillGaps is off)`));
        } else {
          // Everything after `last` up to the channel's current position, this message included: under a
          // burst (priorities overtaking, skipped offsets) one request covers what is still on its way.
          await this._fill(conn, sub, last);
          if (this._isDuplicate(sub, m)) return; // delivered from history (or inside the Gap history reported)
        }
      }
    }
    this._deliver(conn, sub, m);
  }

  /** Fetch what came after `last` with `history since`, deliver it, and report a Gap for what is gone. */
  async _fill(conn, sub, last) {
    let since = last;
    let unrecovered = false;
    for (;;) {
      this.historyFills += 1;
      let res;
      try {
        res = await this._request(conn, { op: "history", channel: sub.channel, since: { ...since } });
      } catch (err) {
        if (!(err instanceof RequestError)) throw err;
        this._hole(conn, sub, `history since offset ${since.offset} failed: ${err.message}`, sub._last, true);
        return;
      }
      const page = await this._history(res);
      if (!page.recovered && !unrecovered && last.offset > 0) { // from offset 0 nothing was had
        unrecovered = true;
        this._hole(conn, sub, `history since offset ${since.offset} of epoch ${since.epoch}: recovered:false `
          + "(no longer held)", sub._last, true);
      }
      for (const m of page.messages) {
        if (sub.types != null && !sub.types.includes(m.type)) continue;
        if (this._isDuplicate(sub, m)) continue;
        this._deliver(conn, sub, m);
      }
      if (!page.more || !page.next) return;
      if (page.next.epoch === since.epoch && !(page.next.offset > since.offset)) {
        // A page that does not move on (a buggy or hostile server): asking again would loop for ever.
        this._hole(conn, sub, `history since offset ${since.offset} of epoch ${since.epoch} did not move on `
          + `(next: offset ${page.next.offset} of epoch ${page.next.epoch})`, sub._last, true);
        return;
      }
      since = page.next;
    }
  }
}

export default WsdClient;
