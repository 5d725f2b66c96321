// Checks the event catalogue with the official AsyncAPI parser, and validates event data against
// the catalogue's JSON Schemas with Ajv (draft 07). Run by the Rust tests (platform's catalogue
// tests, the end-to-end catalogue test) with NODE_PATH pointing at the modules that
// deploy/local/asyncapi.sh installs:
//
//   node schemas/tools/check.mjs document schemas/asyncapi.json
//       parses and validates the document; prints every diagnostic; exit 1 on any of severity error
//   node schemas/tools/check.mjs records schemas/events records.json
//       records.json: [{"type": "...", "version": N, "data": {...}, "headers": {...}?}, ...]; validates
//       each record's data against schemas/events/<type>.v<N>.json and, when given, its headers
//       against the headers schema of message <type>_v<N> in the AsyncAPI document next to that
//       folder (../asyncapi.json); prints every failure; exit 1 on any
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';

// NODE_PATH is honoured by require(), not by import: resolve the modules through require.
const require = createRequire(import.meta.url);
const [mode, path, extra] = process.argv.slice(2);

async function checkDocument(file) {
  const { Parser, DiagnosticSeverity } = require('@asyncapi/parser');
  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(readFileSync(file, 'utf8'));
  const name = (s) => Object.keys(DiagnosticSeverity).find((k) => DiagnosticSeverity[k] === s) ?? String(s);
  for (const d of diagnostics) {
    console.log(`${name(d.severity)} ${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
  }
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  if (!document || errors.length > 0) {
    console.error(`${file}: ${errors.length} error(s); the AsyncAPI parser did not accept the document`);
    process.exit(1);
  }
  const channels = document.channels().all().map((c) => c.address());
  const messages = document.allMessages().all().length;
  console.log(`${file}: valid AsyncAPI ${document.version()} (${channels.length} channels: ${channels.join(', ')}; ${messages} messages)`);
}

function checkRecords(dir, recordsFile) {
  const Ajv = require('ajv');
  const addFormats = require('ajv-formats');
  // strict: every keyword must be known; uint32 is the only non-standard format schemars emits.
  const ajv = new Ajv({ allErrors: true, strict: true, formats: { uint32: true } });
  addFormats(ajv);
  const validators = new Map();
  for (const f of readdirSync(dir).filter((f) => f.endsWith('.json'))) {
    validators.set(f.replace(/\.json$/, ''), ajv.compile(JSON.parse(readFileSync(join(dir, f), 'utf8'))));
  }
  const doc = JSON.parse(readFileSync(join(dir, '..', 'asyncapi.json'), 'utf8'));
  const headerValidators = new Map();
  for (const [id, m] of Object.entries(doc.components.messages)) {
    if (m.headers) headerValidators.set(id, ajv.compile(m.headers));
  }
  const records = JSON.parse(readFileSync(recordsFile, 'utf8'));
  let failed = 0;
  const seen = new Map();
  for (const [i, r] of records.entries()) {
    const key = `${r.type}.v${r.version}`;
    const validate = validators.get(key);
    if (!validate) {
      console.error(`record ${i}: no schema ${key}.json`);
      failed++;
      continue;
    }
    if (!validate(r.data)) {
      console.error(`record ${i} (${key}): ${ajv.errorsText(validate.errors)}: ${JSON.stringify(r.data)}`);
      failed++;
    } else if (r.headers) {
      const message = `${r.type.replaceAll('.', '_')}_v${r.version}`;
      const validateHeaders = headerValidators.get(message);
      if (!validateHeaders) {
        console.error(`record ${i}: no message ${message} in the AsyncAPI document`);
        failed++;
      } else if (!validateHeaders(r.headers)) {
        console.error(`record ${i} (${message} headers): ${ajv.errorsText(validateHeaders.errors)}: ${JSON.stringify(r.headers)}`);
        failed++;
      }
    }
    seen.set(key, (seen.get(key) ?? 0) + 1);
  }
  console.log(`${records.length} record(s) checked, ${failed} invalid; by schema: ${JSON.stringify(Object.fromEntries(seen))}`);
  if (failed > 0) process.exit(1);
}

if (mode === 'document') {
  await checkDocument(path);
} else if (mode === 'records') {
  checkRecords(path, extra);
} else {
  console.error('usage: check.mjs document FILE | check.mjs records SCHEMA_DIR RECORDS_FILE');
  process.exit(2);
}
