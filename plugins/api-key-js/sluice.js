// The Sluice plugin vocabulary for JavaScript, in the words of the Rust SDK
// (plugin-sdk) and of plugins/path-guard-py/sluice.py, over the records of the
// sluice:plugin WIT as componentize-js maps them.
//
//   import { plugin, allow, deny } from './sluice.js';
//   export const { init, onRequest, onClose } = plugin({
//     headers: ['x-api-key'],        // the request headers onRequest reads (or a function)
//     fields: [],                    // the other fields it reads ('path', 'clientIp', ...)
//     configure(config) { ... },     // the parsed config; throw a string to refuse it
//     onRequest(req) { return allow().setHeader('x-user', req.header('x-api-key')); },
//   });
//
// `req` reads only what the plugin declared and throws, naming the declaration
// to add, for anything else (never a silent empty value). `allow()` and
// `deny(status, body)` build decisions; `counterAdd`, `log` and `documents`
// reach the host.
import { counterAdd as hostCounterAdd, log as hostLog } from 'sluice:plugin/host@0.7.0';

// The WIT `fields` flags by the names a plugin declares them with.
const FIELDS = {
  method: 'method',
  scheme: 'scheme',
  authority: 'authority',
  path: 'path',
  query: 'query',
  clientAddr: 'clientAddr',
  clientIp: 'clientIp',
  tls: 'tls',
  route: 'route',
  tenant: 'tenant',
  subprotocols: 'subprotocols',
};

// The text fields, in the order the WIT's `request.text` holds them.
const TEXT_FIELDS = ['method', 'scheme', 'authority', 'path', 'query', 'clientAddr', 'clientIp', 'route', 'tenant'];

/// The WIT `request` (its text is one string of NUL-ended parts, see the WIT) as
/// plain fields: those it carries, by name, and `headers` as `{ name, value }`.
export function unpack(raw) {
  const parts = raw.text.split('\0');
  let at = 0;
  const next = (n) => parts.slice(at, (at += n));
  const view = { kind: raw.kind };
  for (const name of TEXT_FIELDS) {
    if (raw.fields[name]) view[name] = parts[at++];
  }
  if (view.tenant === '') view.tenant = undefined;
  if (raw.fields.tls && raw.tlsOn) {
    const [sni, alpn, clientCertSubject] = next(3).map((v) => v || undefined);
    view.tls = { sni, alpn, clientCertSubject, clientCertNames: next(raw.certNames) };
  }
  if (raw.fields.subprotocols) view.subprotocols = next(raw.subprotocols);
  view.headers = [];
  for (let i = 0; i < raw.headers; i++) {
    const [name, value] = next(2);
    view.headers.push({ name, value });
  }
  return view;
}

/// A request as the plugin sees it: the fields and headers it declared, read from
/// the WIT request's text when asked for (a plugin reads a few of them).
class Request {
  constructor(raw, headers, fields) {
    this.wit = raw;
    this.declaredHeaders = headers;
    this.declaredFields = fields;
  }

  /// Every field it carries, unpacked once.
  get raw() {
    this.unpacked ??= unpack(this.wit);
    return this.unpacked;
  }

  field(name) {
    if (this.declaredFields !== null && !this.declaredFields.includes(name)) {
      throw `the plugin reads the request's ${name}, which its fields leave out: add '${name}'`;
    }
    return this.raw[name];
  }

  method() { return this.field('method'); }
  scheme() { return this.field('scheme'); }
  authority() { return this.field('authority'); }
  path() { return this.field('path'); }
  query() { return this.field('query'); }
  clientAddr() { return this.field('clientAddr'); }
  clientIp() { return this.field('clientIp'); }
  route() { return this.field('route'); }
  /// The tenant assigned, or undefined.
  tenant() { return this.field('tenant'); }
  /// `{ sni, alpn, clientCertSubject, clientCertNames }`, or undefined on plain text.
  tls() { return this.field('tls'); }
  subprotocols() { return this.field('subprotocols'); }
  isWebSocket() { return this.wit.kind === 'websocket'; }

  /// The first value of a header (names match in any case); undefined when absent.
  header(name) {
    const lower = name.toLowerCase();
    if (this.declaredHeaders !== null && !this.declaredHeaders.includes(lower)) {
      throw `the plugin reads the request header \`${lower}\`, which its headers do not name: add '${lower}'`;
    }
    // The header pairs come after the fields' parts.
    const raw = this.wit;
    this.parts ??= raw.text.split('\0');
    let at = TEXT_FIELDS.filter((f) => raw.fields[f]).length;
    if (raw.fields.tls && raw.tlsOn) at += 3 + raw.certNames;
    if (raw.fields.subprotocols) at += raw.subprotocols;
    for (let i = at; i < at + 2 * raw.headers; i += 2) {
      if (this.parts[i] === lower) return this.parts[i + 1];
    }
    return undefined;
  }
}

/// A part of a decision's text: NUL-ended, a NUL inside written as U+FFFD.
const part = (value) => `${String(value).replaceAll('\0', '\uFFFD')}\0`;

/// A verdict under construction: `allow()` or `deny(status, body)`. It crosses as
/// the WIT `decision`: one string of items (header changes, choices, log fields, in
/// the order made, each a kind character then NUL-ended parts), then the body.
class Decision {
  constructor(status, body) {
    this.status = status;
    this.body = String(body ?? '');
    this.text = '';
    this.items = 0;
    this.reuseMs = 0;
  }

  item(kind, ...parts) {
    this.text += kind + parts.map(part).join('');
    this.items += 1;
    return this;
  }

  /// Replace an upstream request header (on a deny: a response header).
  setHeader(name, value) { return this.item('=', String(name).toLowerCase(), value); }

  /// Add a header value, keeping the others (upstream, or the response's on a deny).
  appendHeader(name, value) { return this.item('+', String(name).toLowerCase(), value); }

  /// Remove a header (upstream, or the response's on a deny).
  removeHeader(name) { return this.item('-', String(name).toLowerCase()); }

  /// Add a field to the access-log line.
  logField(name, value) { return this.item('l', String(name).toLowerCase(), value); }

  /// Let the gateway give this decision again, without a call, to requests that
  /// show the plugin the same inputs, for up to `seconds`.
  reuseFor(seconds) {
    this.reuseMs = Math.max(0, Math.min(Math.floor(seconds * 1000), 2 ** 32 - 1));
    return this;
  }

  choose(kind, value) { return this.status === 0 ? this.item(kind, value) : this; }

  /// The upstream pool to use (one the route allows). No effect on a deny.
  pool(name) { return this.choose('p', name); }
  /// The tenant of this exchange. No effect on a deny.
  tenant(name) { return this.choose('t', name); }
  /// The consistent-hash key. No effect on a deny.
  stickyKey(key) { return this.choose('k', key); }
  /// The subprotocol to select (one the client offered). No effect on a deny.
  subprotocol(name) { return this.choose('s', name); }

  /// The WIT `decision` record.
  toWit() {
    return { status: this.status, reuseMs: this.reuseMs, items: this.items, text: this.text + this.body };
  }
}

/// Let the request through, unchanged until changed.
export const allow = () => new Decision(0, '');

/// Refuse the request with this status (300 to 599) and body.
export const deny = (status, body) => new Decision(status, body);

/// Add `delta` to the counter `key` in the current window of `windowMs` and
/// return its value (counters are this plugin's, per tenant, fleet-wide with
/// [cluster]).
export const counterAdd = (key, delta, windowMs) =>
  Number(hostCounterAdd(key, BigInt(delta), BigInt(windowMs)));

/// Log through the gateway (level: 'trace' | 'debug' | 'info' | 'warn' | 'error').
export const log = (level, message, fields = {}) =>
  hostLog(level, message, Object.entries(fields).map(([k, v]) => [k, String(v)]));

/// The component's exports for a plugin described by `spec`: `headers` and
/// `fields` it reads (arrays, or functions giving them once configured; omit
/// one for all), `configure(config)` run by init with the parsed config (throw
/// a string to refuse it), `onRequest(req)` returning a decision, and an
/// optional `onClose(info)`.
export function plugin(spec) {
  const declared = (v) => (typeof v === 'function' ? v() : v);
  let headers = null;
  let fields = null;
  return {
    init(config) {
      let parsed;
      try {
        parsed = JSON.parse(config || '{}');
      } catch (e) {
        throw `invalid config: ${e.message}`;
      }
      spec.configure?.(parsed);
      const h = declared(spec.headers);
      const f = declared(spec.fields);
      headers = h === undefined ? null : h.map((name) => name.toLowerCase());
      fields = f === undefined ? null : [...f];
      const flags = {};
      for (const name of fields ?? []) {
        if (!(name in FIELDS)) {
          throw `unknown request field '${name}' (one of ${Object.keys(FIELDS).join(', ')})`;
        }
        flags[name] = true;
      }
      return {
        hooks: { onClose: spec.onClose !== undefined },
        headers: headers ?? undefined,
        fields: fields === null ? undefined : flags,
      };
    },
    onRequest(raw) {
      return spec.onRequest(new Request(raw, headers, fields)).toWit();
    },
    onClose(info) {
      spec.onClose?.(info);
    },
  };
}
