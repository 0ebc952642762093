// The JavaScript helper (../sluice.js) under Node, with the host's imports stubbed: a
// plugin reads only what it declared, and reading anything else throws, naming the
// declaration to add (never a silent empty value). Run by tests/run.sh:
//   node --test plugins/api-key-js/test/
import assert from 'node:assert/strict';
import { register } from 'node:module';
import { test } from 'node:test';

// `sluice:plugin/...` exists only inside a component; here it resolves to a stub.
const stub = 'export function counterAdd() { return 0n; } export function log() {}';
register(
  'data:text/javascript,' +
    encodeURIComponent(`
export async function resolve(specifier, context, next) {
  if (specifier.startsWith('sluice:plugin/')) {
    return { url: 'data:text/javascript,' + encodeURIComponent(${JSON.stringify(stub)}), shortCircuit: true };
  }
  return next(specifier, context);
}`),
);
const { plugin, allow, deny, unpack } = await import('../sluice.js');

/// The WIT request a plugin that declared nothing is handed (componentize-js's
/// mapping): every field, no subprotocols, two headers.
const raw = {
  kind: 'websocket',
  fields: Object.fromEntries(
    ['method', 'scheme', 'authority', 'path', 'query', 'clientAddr', 'clientIp', 'tls', 'route', 'tenant', 'subprotocols'].map(
      (f) => [f, true],
    ),
  ),
  tlsOn: false,
  certNames: 0,
  subprotocols: 0,
  headers: 2,
  text: ['GET', 'http', 'a.example', '/chat', 'room=1', '127.0.0.1:4000', '127.0.0.1', 'ws', '']
    .concat(['x-api-key', 'k1', 'authorization', 'Bearer t'])
    .map((part) => part + '\0')
    .join(''),
};

/// The exports of a plugin declaring `headers` and `fields` whose onRequest runs `read`.
function exportsReading(headers, fields, read) {
  const exports = plugin({ headers, fields, onRequest: (req) => allow().setHeader('x-read', String(read(req))) });
  exports.init('{}');
  return exports;
}

test('a declared header is read, in any case', () => {
  const exports = exportsReading(['X-Api-Key'], [], (req) => req.header('X-API-KEY'));
  assert.equal(exports.onRequest(raw).text, '=x-read\0k1\0');
});

test('an undeclared header throws, naming the declaration to add', () => {
  const exports = exportsReading(['x-api-key'], [], (req) => req.header('Authorization'));
  assert.throws(() => exports.onRequest(raw), (e) => /headers do not name: add 'authorization'/.test(e));
});

test('an undeclared field throws, naming the declaration to add', () => {
  const exports = exportsReading(['x-api-key'], [], (req) => req.path());
  assert.throws(() => exports.onRequest(raw), (e) => /fields leave out: add 'path'/.test(e));
});

test('a plugin that declares nothing reads everything', () => {
  const exports = exportsReading(undefined, undefined, (req) => `${req.header('authorization')} ${req.path()}`);
  assert.equal(exports.onRequest(raw).text, '=x-read\0Bearer t /chat\0');
});

test('a decision crosses as one text of items in the order made', () => {
  const allowed = allow()
    .logField('User', 'al\0ice')
    .stickyKey('K')
    .setHeader('X-User', 'alice')
    .pool('blue')
    .removeHeader('x-secret')
    .toWit();
  assert.deepEqual([allowed.status, allowed.items], [0, 5]);
  assert.equal(allowed.text, 'luser\0al\uFFFDice\0kK\0=x-user\0alice\0pblue\0-x-secret\0');
  const refused = deny(429, 'slow\0down').setHeader('Retry-After', 60).pool('ignored').toWit();
  assert.deepEqual([refused.status, refused.items], [429, 1]);
  assert.equal(refused.text, '=retry-after\x0060\0slow\0down');
});

test('the request text is read back into its fields', () => {
  const view = unpack(raw);
  assert.equal(view.clientIp, '127.0.0.1');
  assert.equal(view.tenant, undefined);
  assert.deepEqual(view.subprotocols, []);
  assert.deepEqual(view.headers[1], { name: 'authorization', value: 'Bearer t' });
  const tls = unpack({
    kind: 'http',
    fields: { tls: true, path: true, subprotocols: true },
    tlsOn: true,
    certNames: 1,
    subprotocols: 1,
    headers: 0,
    text: '/p\0a.example\0h2\0\0alice.example\0chat\0',
  });
  assert.deepEqual(tls.tls, { sni: 'a.example', alpn: 'h2', clientCertSubject: undefined, clientCertNames: ['alice.example'] });
  assert.deepEqual([tls.path, tls.subprotocols, tls.method], ['/p', ['chat'], undefined]);
});

test('init reports the declarations and refuses an unknown field', () => {
  const exports = plugin({ headers: ['X-Api-Key'], fields: ['path'], onRequest: () => allow() });
  const interest = exports.init('{}');
  assert.deepEqual(interest.headers, ['x-api-key']);
  assert.deepEqual(interest.fields, { path: true });
  assert.equal(interest.hooks.onClose, false);
  const bad = plugin({ headers: [], fields: ['pathh'], onRequest: () => allow() });
  assert.throws(() => bad.init('{}'), (e) => /unknown request field 'pathh'/.test(e));
});
