/**
 * The property syntax, case for case as the Python SDK (both read property-syntax-cases.json,
 * tests/unit/test_client_properties.py the same file), then what only Node does: reading the
 * files a property names, and building requests. None of these needs a gateway.
 */

import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";

import { buildExplainRequest, naturalCompare, parseProperty, splitProperty } from "../src";

// dist/test/ -> the package root.
const CASES = path.resolve(__dirname, "..", "..", "test", "property-syntax-cases.json");
const cases = JSON.parse(readFileSync(CASES, "utf-8")) as {
  valid: [string, unknown][];
  invalid: [string, string][];
};
const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);

test("valid specs split as the Python SDK splits them", () => {
  for (const [text, expected] of cases.valid) {
    assert.deepEqual(splitProperty(text), expected, text);
  }
});

test("malformed specs are refused with the Python SDK's words", () => {
  for (const [text, words] of cases.invalid) {
    assert.throws(() => splitProperty(text), (error: Error) => {
      assert.match(error.message, /^invalid property/);
      assert.ok(error.message.includes(words), `${text}: ${error.message}`);
      return true;
    });
  }
});

test("editor properties become Property messages with their region", async () => {
  assert.deepEqual(await parseProperty("b=ed@1:sigma=2"), {
    name: "b",
    editor: { model: "ed", version: "1", parameters: { sigma: "2" } },
  });
  assert.deepEqual((await parseProperty("h=procedural;box_px=1,2,30,40")).region, {
    box: { left: 1, top: 2, right: 30, bottom: 40, pixels: true },
  });
  assert.deepEqual((await parseProperty("h=procedural;box=0.1,0.2,0.6,0.9")).region, {
    box: { left: 0.1, top: 0.2, right: 0.6, bottom: 0.9, pixels: false },
  });
});

test("masks and provided-path folders are read relative to baseDir, folders in natural order", async () => {
  const base = mkdtempSync(path.join(tmpdir(), "propscope-node-"));
  writeFileSync(path.join(base, "mask.png"), PNG);
  writeFileSync(path.join(base, "notes.txt"), "not a PNG");
  mkdirSync(path.join(base, "path"));
  for (const [name, byte] of [["x_10.png", 10], ["x_2.png", 2], ["x_1.png", 1], [".hidden.png", 0]]) {
    writeFileSync(path.join(base, "path", name as string), Buffer.concat([PNG, Buffer.from([byte as number])]));
  }
  writeFileSync(path.join(base, "path", "readme.md"), "left out");
  const masked = await parseProperty("h=procedural;mask=mask.png", { baseDir: base });
  assert.deepEqual(masked.region, { mask: PNG });
  const provided = await parseProperty("real=@path/", { baseDir: base });
  const images = provided.providedPath?.images as Buffer[];
  assert.deepEqual(images.map((image) => image[image.length - 1]), [1, 2, 10]);
  const parse = (text: string) => parseProperty(text, { baseDir: base });
  await assert.rejects(parse("h=ed;mask=missing.png"), /^Error: property 'h': cannot read mask/);
  await assert.rejects(parse("h=ed;mask=notes.txt"), /property 'h': mask '.*notes.txt' is not an image/);
  await assert.rejects(parse("r=@nowhere/"), /is not a folder/);
  mkdirSync(path.join(base, "empty"));
  await assert.rejects(parse("r=@empty"), /holds no image/);
});

test("natural order matches the Python SDK's", () => {
  const names = ["x_10.png", "x_2.png", "X_1.png", "a.png", "x_02.png"];
  assert.deepEqual(names.sort(naturalCompare), ["a.png", "X_1.png", "x_02.png", "x_2.png", "x_10.png"]);
});

test("buildExplainRequest sets preprocessing, labels and path options", async () => {
  const request = await buildExplainRequest({
    image: PNG,
    model: "resnet",
    properties: ["hue=procedural:operation=hue;box=0,0,0.5,0.5"],
    steps: 10,
    maxSteps: 40,
    preprocessing: { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], outputKind: "probabilities", resize: "center_crop" },
    classLabels: ["cat", "dog"],
  });
  assert.deepEqual(request.model?.preprocessing, {
    mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225],
    outputKind: "OUTPUT_KIND_PROBABILITIES",
    resize: "RESIZE_MODE_CENTER_CROP",
  });
  assert.deepEqual(request.model?.classLabels, ["cat", "dog"]);
  assert.equal(request.model?.predictedClass, true);
  assert.equal(request.pathMode, "PATH_MODE_UNSPECIFIED");
  assert.equal(request.maxSteps, 40);
  const fixed = await buildExplainRequest({ image: PNG, model: "m", properties: ["a=ed"], pathMode: "fixed", targetClass: 3 });
  assert.equal(fixed.pathMode, "PATH_MODE_FIXED");
  assert.equal(fixed.model?.targetClass, 3);
});

test("buildExplainRequest refuses bad options naming them", async () => {
  const base = { image: PNG, model: "m", properties: ["a=ed"] };
  const cases: [object, RegExp][] = [
    [{ preprocessing: { mean: [0.5, 0.5] } }, /mean must be 3 numbers/],
    [{ preprocessing: { std: [0.2, 0, 0.2] } }, /std must be positive/],
    [{ preprocessing: { outputKind: "softmax" } }, /outputKind must be logits or probabilities/],
    [{ preprocessing: { resize: "crop" } }, /resize must be squash/],
    [{ pathMode: "fixed", maxSteps: 40 }, /maxSteps applies to adaptive paths/],
    [{ steps: 20, maxSteps: 10 }, /must be at least steps/],
    [{ steps: -1 }, /steps must be an integer >= 0/],
    [{ properties: ["a=ed", "a=ed2"] }, /given twice/],
    [{ model: "" }, /model must be a non-empty/],
    [{ classLabels: ["cat", ""] }, /classLabels must be non-empty/],
  ];
  for (const [overrides, message] of cases) {
    await assert.rejects(buildExplainRequest({ ...base, ...overrides } as never), message);
  }
});
