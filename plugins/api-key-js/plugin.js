// `api-key-js`: API-key auth with an optional per-client rate limit, written
// in JavaScript against the same WIT as the Rust plugins (sluice:plugin@0.7.0)
// with the `sluice.js` helper module, and built into a component by
// componentize-js (see build.mjs).
//
// Config: {"keys": {"<api key>": "<client name>"}, "header": "x-api-key",
//          "rate_limit_per_minute": 0}
// Missing key → 401, unknown key → 403, over the limit → 429. An admitted
// request goes upstream without the key and with `x-client: <client name>`.
import { allow, counterAdd, deny, plugin } from './sluice.js';

let keys = new Map();
let limit = 0;
// The one request header onRequest reads: the gateway copies in only that one,
// and no other request field (`fields: []`).
const config = { header: 'x-api-key' };

// Decisions are never reused (no `reuseFor`): an admission counts towards the
// client's rate limit, so the gateway calls this plugin for every request.
export const { init, onRequest, onClose } = plugin({
  headers: () => [config.header],
  fields: [],
  configure(c) {
    if (c === null || typeof c.keys !== 'object' || c.keys === null) {
      throw 'invalid config: `keys` must map API keys to client names';
    }
    keys = new Map(Object.entries(c.keys));
    config.header = String(c.header ?? 'x-api-key').toLowerCase();
    limit = Number(c.rate_limit_per_minute ?? 0);
  },
  onRequest(req) {
    const sent = req.header(config.header);
    if (sent === undefined) {
      return deny(401, 'missing api key\n').setHeader('www-authenticate', 'ApiKey');
    }
    const client = keys.get(sent);
    if (client === undefined) {
      return deny(403, 'unknown api key\n');
    }
    if (limit > 0 && counterAdd(client, 1, 60000) > limit) {
      return deny(429, 'rate limit exceeded\n').setHeader('retry-after', '60');
    }
    return allow()
      .removeHeader(config.header)
      .setHeader('x-client', client)
      .logField('client', client);
  },
});
