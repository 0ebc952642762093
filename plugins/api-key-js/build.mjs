// Build plugin.js into a component: node build.mjs WIT_DIR OUT.wasm
// Run by plugins/build.sh with componentize-js installed next to it.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const [witPath, outPath] = process.argv.slice(2);
if (!witPath || !outPath) {
  console.error('usage: node build.mjs WIT_DIR OUT.wasm');
  process.exit(2);
}
const { component } = await componentize({
  sourcePath: fileURLToPath(new URL('./plugin.js', import.meta.url)),
  witPath,
  worldName: 'plugin',
  // A policy plugin needs none of these; without them the component imports
  // (almost) no WASI at all.
  disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
});
await writeFile(outPath, component);
