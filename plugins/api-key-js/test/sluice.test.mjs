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
const { plugin, allow } = await import('../sluice.js');

/// A request record as componentize-js hands it to `onRequest`.
const raw = {
  kind: 'websocket',
  path: undefined,
  headers: [
    { name: 'x-api-key', value: 'k1' },
    { name: 'authorization', value: 'Bearer t' },
  ],
};

/// The exports of a plugin declaring `headers` and `fields` whose onRequest runs `read`.
function exportsReading(headers, fields, read) {
  const exports = plugin({ headers, fields, onRequest: (req) => allow().setHeader('x-read', String(read(req))) });
  exports.init('{}');
  return exports;
}

test('a declared header is read, in any case', () => {
  const exports = exportsReading(['X-Api-Key'], [], (req) => req.header('X-API-KEY'));
  const decision = JSON.stringify(exports.onRequest(raw), (_, v) => (typeof v === 'bigint' ? String(v) : v));
  assert.match(decision, /"k1"/);
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
  assert.doesNotThrow(() => exports.onRequest(raw));
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
