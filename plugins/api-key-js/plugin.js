// `api-key-js`: API-key auth with an optional per-client rate limit, written
// in JavaScript against the same WIT as the Rust plugins (sluice:plugin@0.5.1)
// and built into a component by componentize-js (see build.mjs).
//
// Config: {"keys": {"<api key>": "<client name>"}, "header": "x-api-key",
//          "rate_limit_per_minute": 0}
// Missing key → 401, unknown key → 403, over the limit → 429. An admitted
// request goes upstream without the key and with `x-client: <client name>`.
import { counterAdd } from 'sluice:plugin/host@0.5.1';

let keys = new Map();
let header = 'x-api-key';
let limit = 0n;

export function init(config) {
  let c;
  try {
    c = JSON.parse(config || '{}');
  } catch (e) {
    throw `invalid config: ${e.message}`;
  }
  if (c === null || typeof c.keys !== 'object' || c.keys === null) {
    throw 'invalid config: `keys` must map API keys to client names';
  }
  keys = new Map(Object.entries(c.keys));
  header = String(c.header ?? 'x-api-key').toLowerCase();
  limit = BigInt(c.rate_limit_per_minute ?? 0);
  // The `interest` record: `hooks` flags are an object of booleans (no
  // `on-close` wanted, so the gateway never calls onClose), `headers`
  // names the one request header onRequest reads: the gateway copies in
  // only that one, and `fields` (flags again, every one false) says it reads
  // none of the other request fields, which then arrive as undefined.
  return { hooks: { onClose: false }, headers: [header], fields: {} };
}

// `reuseMs: 0`: the gateway calls this plugin for every request, since an
// admission counts towards the client's rate limit.
const deny = (status, body, headers = []) => ({
  tag: 'deny',
  val: { status, headers, body, logFields: [], reuseMs: 0 },
});

export function onRequest(req) {
  const sent = req.headers.find((h) => h.name === header);
  if (sent === undefined) {
    return deny(401, 'missing api key\n', [{ name: 'www-authenticate', value: 'ApiKey' }]);
  }
  const client = keys.get(sent.value);
  if (client === undefined) {
    return deny(403, 'unknown api key\n');
  }
  if (limit > 0n && counterAdd(client, 1n, 60000n) > limit) {
    return deny(429, 'rate limit exceeded\n', [{ name: 'retry-after', value: '60' }]);
  }
  return {
    tag: 'continue',
    val: {
      headers: [
        { tag: 'remove', val: header },
        { tag: 'set', val: { name: 'x-client', value: client } },
      ],
      pool: undefined,
      tenant: undefined,
      stickyKey: undefined,
      subprotocol: undefined,
      logFields: [{ name: 'client', value: client }],
      reuseMs: 0,
    },
  };
}

// Required by the world, but never called: init did not ask for it.
export function onClose(_info) {}
