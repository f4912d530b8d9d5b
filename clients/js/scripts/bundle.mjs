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
const kb = (n) => (n / 1024).toFixed(1);
console.log(`${outfile}: ${kb(bytes.length)} KiB minified, ${kb(gzipSync(bytes, { level: 9 }).length)} KiB minified+gzip`);
