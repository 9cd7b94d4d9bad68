// Writes src/generated/*.ts from the project's JSON Schemas (../../schemas/*.schema.json): one
// file of types per schema, and json-schemas.ts with the schemas themselves (runtime validation).
//   npm run generate          regenerate the checked-in files
//   npm run generate:check    exit 1, naming the stale files, when they differ from the schemas
import { readFile, readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { compile } from 'json-schema-to-typescript';

const here = path.dirname(fileURLToPath(import.meta.url));
const schemasDir = path.resolve(here, '../../../schemas');
const outDir = path.resolve(here, '../src/generated');
const check = process.argv.includes('--check');

const banner = (file) =>
  `/* Generated from schemas/${file} by \`npm run generate\`; do not edit by hand. */`;

// pydantic titles every field ("Run Id"); json-schema-to-typescript would make each a named
// alias (`RunId`, `Attempt1`, ...). Only the models' titles (root and $defs) name types.
function withoutFieldTitles(node, named = true) {
  if (Array.isArray(node)) return node.map((item) => withoutFieldTitles(item, false));
  if (node === null || typeof node !== 'object') return node;
  const out = {};
  for (const [key, value] of Object.entries(node)) {
    if (key === 'title' && !named) continue;
    if (key === '$defs') {
      out[key] = Object.fromEntries(
        Object.entries(value).map(([name, def]) => [name, withoutFieldTitles(def, true)]),
      );
    } else {
      out[key] = withoutFieldTitles(value, false);
    }
  }
  return out;
}

const stale = [];
const outputs = [];
const embedded = [];
for (const file of (await readdir(schemasDir)).filter((f) => f.endsWith('.schema.json')).sort()) {
  const schema = withoutFieldTitles(
    JSON.parse(await readFile(path.join(schemasDir, file), 'utf8')),
  );
  // The `$id`s are URNs that name no file: every reference in them is internal (`#/$defs/...`).
  const ts = await compile(schema, schema.title, {
    bannerComment: banner(file),
    additionalProperties: false,
    unreachableDefinitions: false,
    format: true,
    style: { singleQuote: true, printWidth: 100 },
  });
  outputs.push([file.replace('.schema.json', '.ts'), ts]);
  const name = file.replace('.schema.json', '').replace(/-(.)/g, (_, c) => c.toUpperCase());
  const raw = JSON.parse(await readFile(path.join(schemasDir, file), 'utf8'));
  embedded.push(
    `export const ${name}Schema: Record<string, unknown> = ${JSON.stringify(raw, null, 2)};\n`,
  );
}
outputs.push([
  'json-schemas.ts',
  `/* Generated from schemas/*.schema.json by \`npm run generate\`; do not edit by hand. */\n\n` +
    embedded.join('\n'),
]);

for (const [name, content] of outputs) {
  const target = path.join(outDir, name);
  if (check) {
    const current = await readFile(target, 'utf8').catch(() => null);
    if (current !== content) stale.push(path.relative(process.cwd(), target));
  } else {
    await writeFile(target, content);
    console.log(`wrote ${path.relative(process.cwd(), target)}`);
  }
}
if (stale.length) {
  console.error(`stale generated types (run \`npm run generate\`): ${stale.join(', ')}`);
  process.exit(1);
}
