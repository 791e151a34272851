/**
 * The client and the example against the real running gateway at $PROPSCOPE_TARGET (`make test`
 * runs them through tests/integration/test_node_client.py on its own stack).
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { promisify } from "node:util";

import * as grpc from "@grpc/grpc-js";
import sharp from "sharp";

import {
  createClient,
  parseProperty,
  PropscopeError,
  splitProperty,
  type ExplainEvent,
  type ExplainRequest,
} from "../src";

const target = process.env.PROPSCOPE_TARGET;
if (!target) {
  throw new Error(
    "PROPSCOPE_TARGET is not set: these tests need a running gateway, e.g. " +
      "`make up`, then `PROPSCOPE_TARGET=127.0.0.1:50051 npm test`",
  );
}

// dist/test/ -> the package root -> the repository.
const PACKAGE_ROOT = path.resolve(__dirname, "..", "..");
const SAMPLE = path.resolve(PACKAGE_ROOT, "..", "..", "docs", "sample.png");
const EXAMPLE = path.join(PACKAGE_ROOT, "dist", "examples", "explain.js");
const HUE = "object_hue=procedural:operation=hue,region=object";
const TIMEOUT_MS = 120_000;

const client = createClient(target);
after(() => client.close());

async function request(overrides: Partial<ExplainRequest> = {}): Promise<ExplainRequest> {
  return {
    image: readFileSync(SAMPLE),
    model: { name: "synth_hue", predictedClass: true },
    properties: [await parseProperty(HUE)],
    steps: 6,
    seed: "7",
    ...overrides,
  };
}

async function explain(message: ExplainRequest): Promise<ExplainEvent[]> {
  const events: ExplainEvent[] = [];
  for await (const event of client.explain(message, { deadline: Date.now() + TIMEOUT_MS })) {
    events.push(event);
  }
  return events;
}

function refusedWith(code: grpc.status, words: string, field?: string) {
  return (error: unknown) => {
    assert.ok(error instanceof PropscopeError, String(error));
    assert.equal(error.codeName, grpc.status[code]);
    assert.ok(error.details.includes(words), error.details);
    if (field) assert.deepEqual(error.fieldViolations.map((v) => v.field), [field]);
    return true;
  };
}

test("ListModels lists synth_hue as a classifier and procedural as an editor", async () => {
  const models = await client.listModels({ deadline: Date.now() + TIMEOUT_MS });
  const roles = new Map(models.map((model) => [model.name, model.role]));
  assert.equal(roles.get("synth_hue"), "ROLE_CLASSIFIER");
  assert.equal(roles.get("procedural"), "ROLE_EDITOR");
});

test("Explain streams Accepted first, an OK result per property, Done last", async () => {
  const events = await explain(await request());
  const first = events[0];
  const last = events[events.length - 1];
  assert.equal(first.event, "accepted");
  assert.deepEqual(first.accepted.propertyNames, ["object_hue"]);
  assert.equal(first.accepted.steps, 6);
  assert.equal(last.event, "done");
  assert.equal(last.done.propertiesFailed, 0);
  assert.equal(new Set(events.map((event) => event.requestId)).size, 1);

  const results = events.flatMap((event) =>
    event.event === "propertyResult" ? [event.propertyResult] : [],
  );
  assert.equal(results.length, 1);
  const [result] = results;
  assert.equal(result.propertyName, "object_hue");
  assert.equal(result.status?.code, 0);
  assert.ok(Number.isFinite(result.score) && result.score > 0, `score ${result.score}`);
  assert.equal(result.relevant, true); // the hue-biased model follows the object's hue
  const [sample] = result.samples;
  assert.equal(sample.seed, "7"); // uint64 as a decimal string
  assert.equal(sample.predictionCurve.length, 6 + 1);
  const curve = sample.predictionCurve;
  assert.ok(curve.every((p) => p >= 0 && p <= 1), String(curve));
});

test("an unknown model is NOT_FOUND", async () => {
  await assert.rejects(
    explain(await request({ model: { name: "no_such_model" } })),
    refusedWith(grpc.status.NOT_FOUND, "'no_such_model'"),
  );
});

test("a request without properties is INVALID_ARGUMENT naming the field", async () => {
  await assert.rejects(
    explain(await request({ properties: [] })),
    refusedWith(grpc.status.INVALID_ARGUMENT, "properties is empty", "properties"),
  );
});

test("the example prints a line per property and the timings", async () => {
  const options = ["--model", "synth_hue", "--property", HUE, "--steps", "6", "--target", target];
  const { stdout } = await promisify(execFile)(process.execPath, [EXAMPLE, SAMPLE, ...options], {
    timeout: TIMEOUT_MS,
  });
  assert.match(
    stdout,
    /^object_hue: score [\d.e+-]+, p-value [\d.e+-]+, significant yes, relevant yes, N \d+, flipped yes, target 0 \(circle\)$/m,
  );
  assert.match(stdout, /^done: total \d+ ms, edit \d+ ms, classify \d+ ms, .*, 0 failed$/m);
});

test("every property and example in the example's --help works on the live service", async () => {
  const run = promisify(execFile);
  const { stdout: help } = await run(process.execPath, [EXAMPLE, "--help"]);
  const editors = new Map((await client.listModels()).map((model) => [model.name, model]));
  const specs = [...help.matchAll(/-p '([^']+)'/g)].map((match) => match[1]);
  assert.ok(specs.length >= 5, help);
  for (const spec of specs) {
    const { editor, parameters } = splitProperty(spec);
    if (editor === null) continue; // a provided path
    const declared = new Map(editors.get(editor)?.editorParameters.map((p) => [p.name, p]));
    assert.ok(declared.size, `${spec}: editor '${editor}' is not served`);
    for (const [key, value] of Object.entries(parameters)) {
      const parameter = declared.get(key);
      assert.ok(parameter, `${spec}: '${editor}' has no parameter '${key}'`);
      assert.ok(!parameter.choices.length || parameter.choices.includes(value), `${spec}: ${key}=${value}`);
    }
  }
  // The examples whose image is in the repository run as written, from client/node.
  const examples = help.split("\nexamples")[1].split("\n\n")[0].replace(/ \\\n\s*/g, " ");
  const commands = examples.split("\n").filter((line) => line.trim().startsWith("node "));
  const runnable = commands
    .map((line) => [...line.matchAll(/'([^']*)'|(\S+)/g)].map((match) => match[1] ?? match[2]).slice(1))
    .filter(([script, image]) => script === "dist/examples/explain.js" && image.startsWith("../../docs/"));
  assert.ok(runnable.length >= 1, examples);
  for (const [script, ...options] of runnable) {
    const { stdout } = await run(process.execPath, [script, ...options, "--target", target], {
      cwd: PACKAGE_ROOT,
      timeout: TIMEOUT_MS,
    });
    assert.match(stdout, /^done: total /m);
  }
});

test("the example exits 3 when a property fails, printing the others", async () => {
  // A hue rotation of a grey image changes nothing: that property fails, brightness is scored.
  const grey = path.join(mkdtempSync(path.join(tmpdir(), "propscope-node-example-")), "grey.png");
  writeFileSync(grey, await sharp(Buffer.alloc(64 * 64 * 3, 128), { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer());
  const options = ["-m", "synth_hue", "-p", "hue=procedural:operation=hue", "-p", "bright=procedural:operation=brightness"];
  await assert.rejects(
    promisify(execFile)(process.execPath, [EXAMPLE, grey, ...options, "--steps", "6", "--target", target], { timeout: TIMEOUT_MS }),
    (error: { code: number; stdout: string }) => {
      assert.equal(error.code, 3, error.stdout);
      assert.match(error.stdout, /^hue: failed \(code 9\): /m);
      assert.match(error.stdout, /^bright: score /m);
      assert.match(error.stdout, /, 1 failed$/m);
      return true;
    },
  );
});

test("attribute and evaluateAttribution against the live service", async () => {
  const progress: number[] = [];
  const found = await client.attribute(
    { image: readFileSync(SAMPLE), model: "synth_patch", gridSize: 4, nbDesign: 8 },
    { deadline: Date.now() + TIMEOUT_MS, onProgress: (update) => progress.push(update.forwardPassesDone) },
  );
  assert.equal(found.method, "sobol");
  assert.equal(found.forwardPasses, 8 * (16 + 2));
  assert.equal(found.map.values.length, found.map.height * found.map.width);
  assert.equal(found.grid.height, 4);
  assert.ok(progress.length > 0 && progress.at(-1) === found.forwardPasses);
  const scored = await client.evaluateAttribution(
    { image: readFileSync(SAMPLE), model: "synth_patch", explanation: found.map, metrics: ["deletion"] },
    { deadline: Date.now() + TIMEOUT_MS },
  );
  assert.equal(scored.results.length, 1);
  assert.equal(scored.results[0].metric, "deletion");
  assert.ok(Number.isFinite(scored.results[0].value));
});

test("attribute with EVA against the live service: verified bounds around the samples", async () => {
  const found = await client.attribute(
    { image: readFileSync(SAMPLE), model: "synth_patch", method: "eva", gridSize: 4, samples: 8 },
    { deadline: Date.now() + TIMEOUT_MS },
  );
  assert.equal(found.method, "eva");
  const eva = found.eva!;
  assert.equal(eva.guarantee, "verified (guaranteed)");
  assert.equal(eva.boundPasses, 4 * 4 + 1);
  assert.equal(eva.regionBounds.length, 16);
  assert.ok(eva.sampledOverlap <= eva.overlapBound, `${eva.sampledOverlap} > ${eva.overlapBound}`);
  assert.equal(eva.certified, eva.overlapBound < 0);
  assert.equal(eva.decision === "certified", eva.certified);
  assert.ok(eva.verdict.startsWith(eva.decision.replace("_", " ")), eva.verdict);
});

test("fitConcepts, conceptBank and conceptMaps against the live service", async () => {
  const deadline = Date.now() + TIMEOUT_MS;
  const image = readFileSync(SAMPLE);
  const found = await client.fitConcepts(
    { images: [image, image], model: "synth_patch", targetClass: 0, rank: 3, nbDesign: 8 },
    { deadline },
  );
  const bank = found.bank;
  assert.match(bank.bankId, /^cb_[0-9a-f]{32}$/);
  assert.equal(found.accepted.layer, "features.2");
  assert.equal(bank.concepts.length, 3);
  assert.equal(bank.basis.length, 3 * 64);
  assert.equal(bank.hPasses, 2 * 8 * (3 + 2) + 3 + 2);
  const again = await client.conceptBank(bank.bankId, { model: "synth_patch", deadline });
  assert.deepEqual(
    again.concepts.map((concept) => concept.index),
    bank.concepts.map((concept) => concept.index),
  );
  const maps = await client.conceptMaps(image, bank.bankId, { deadline });
  assert.equal(maps.maps.length, 3);
  assert.equal(maps.maps[0].values.length, maps.height * maps.width);
  await assert.rejects(
    client.conceptBank(`cb_${"0".repeat(32)}`, { deadline }),
    (error: unknown) => error instanceof PropscopeError && error.codeName === "NOT_FOUND",
  );
});
