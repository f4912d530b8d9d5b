// The browser bundle (one ESM file, @msgpack/msgpack inside, minified) for the demo page and
// for apps without a bundler; prints its size minified and gzipped.
import { build } from 'esbuild';
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';

const outfile = 'dist/presence-client.min.js';
await build({
  entryPoints: ['src/index.ts'],
  bundle: true,
  format: 'esm',
  minify: true,
  target: 'es2020',
  outfile,
  legalComments: 'none',
});
const bytes = readFileSync(outfile);
const gzipped = gzipSync(bytes, { level: 9 }).length;
const kb = (n) => (n / 1024).toFixed(1);
console.log(`${outfile}: ${kb(bytes.length)} KiB minified, ${kb(gzipped)} KiB minified+gzip`);
// A web page pays for every byte on every first load: the budget is part of the build.
const BUDGET = 15 * 1024;
if (gzipped > BUDGET) {
  console.error(`the bundle is over its budget of ${kb(BUDGET)} KiB minified+gzip`);
  process.exit(1);
}
