/**
 * The Python SDK's image conversions (client/propscope/_images.py) without a gateway: PNG and
 * JPEG unchanged, other formats to PNG with Pillow's alpha and grey rules. The pixel-for-pixel
 * comparison with Pillow on files Pillow wrote (BMP, GIF, TIFF, WebP) is in
 * tests/integration/test_node_client.py.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";

import sharp from "sharp";

import { ALPHA_DROPPED, encodeImage, encodeMask, parseProperty } from "../src";

const PNG_MAGIC = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
// Red, green, blue and one mixed pixel, and the grey levels Pillow's convert("L") gives them.
const RGB = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 200, 30];
const PILLOW_GREY = [76, 150, 29, 124];
// Not 0: a lossless WebP encoder may zero the colour of fully transparent pixels.
const ALPHA = [1, 64, 128, 255];
const EXAMPLE = path.resolve(__dirname, "..", "examples", "explain.js");

function rgba(): Buffer {
  return Buffer.from([0, 1, 2, 3].flatMap((pixel) => [...RGB.slice(pixel * 3, pixel * 3 + 3), ALPHA[pixel]]));
}

async function webp(channels: 3 | 4): Promise<Buffer> {
  const pixels = channels === 4 ? rgba() : Buffer.from(RGB);
  return sharp(pixels, { raw: { width: 4, height: 1, channels } }).webp({ lossless: true }).toBuffer();
}

async function pixels(png: Buffer): Promise<{ channels: number; values: number[] }> {
  assert.ok(png.subarray(0, 8).equals(PNG_MAGIC), "not a PNG");
  const { channels } = await sharp(png).metadata();
  const decoded = sharp(png).toColourspace(channels < 3 ? "b-w" : "srgb");
  return { channels, values: [...(await decoded.raw().toBuffer())] };
}

test("PNG and JPEG are sent unchanged, without decoding", async () => {
  for (const magic of [PNG_MAGIC, Buffer.from([0xff, 0xd8, 0xff])]) {
    const data = Buffer.concat([magic, Buffer.from("not decoded")]);
    assert.deepEqual(await encodeImage(data), data);
    assert.deepEqual(await encodeMask(data), data);
  }
});

test("a WebP image becomes an RGB PNG, its alpha dropped and not blended", async () => {
  assert.deepEqual(await pixels(await encodeImage(await webp(4))), { channels: 3, values: RGB });
});

test("a WebP mask keeps its alpha channel, or becomes grey with Pillow's weights", async () => {
  assert.deepEqual(await pixels(await encodeMask(await webp(4))), { channels: 4, values: [...rgba()] });
  assert.deepEqual(await pixels(await encodeMask(await webp(3))), { channels: 1, values: PILLOW_GREY });
});

test("an image with transparent pixels warns that its alpha channel is dropped", async () => {
  const warned: string[] = [];
  const listen = (warning: Error & { code?: string }) => {
    if (warning.code === ALPHA_DROPPED) warned.push(warning.message);
  };
  process.on("warning", listen);
  try {
    const png = await sharp(rgba(), { raw: { width: 4, height: 1, channels: 4 } }).png().toBuffer();
    const opaque = await sharp(Buffer.alloc(16, 255), { raw: { width: 4, height: 1, channels: 4 } }).png().toBuffer();
    for (const image of [png, await webp(4), opaque, await webp(3), Buffer.concat([PNG_MAGIC, Buffer.from("x")])]) {
      await encodeImage(image);
    }
    await new Promise((resolve) => setImmediate(resolve)); // warnings are emitted on the next tick
  } finally {
    process.off("warning", listen);
  }
  assert.equal(warned.length, 2, warned.join("\n"));
  assert.match(warned[0], /^image bytes has transparent pixels; the alpha channel is dropped, not blended/);
});

test("what is no image is refused, naming it", async () => {
  await assert.rejects(encodeImage(Buffer.from("no image")), /^Error: image bytes is not an image the client can read \(PNG, JPEG, WebP/);
  await assert.rejects(encodeMask(Buffer.alloc(0)), /^Error: mask bytes is empty$/);
  await assert.rejects(encodeImage("/no/such/file.webp"), /^Error: cannot read image '\/no\/such\/file.webp'/);
});

test("property masks and provided-path folders convert WebP, TIFF and BMP", async () => {
  const base = mkdtempSync(path.join(tmpdir(), "propscope-node-images-"));
  writeFileSync(path.join(base, "mask.webp"), await webp(4));
  const masked = await parseProperty("h=procedural;mask=mask.webp", { baseDir: base });
  assert.deepEqual(await pixels(masked.region?.mask as Buffer), { channels: 4, values: [...rgba()] });

  mkdirSync(path.join(base, "path"));
  const raw = (value: number) => sharp(Buffer.alloc(4 * 3, value), { raw: { width: 4, height: 1, channels: 3 } });
  writeFileSync(path.join(base, "path", "x_10.webp"), await raw(10).webp({ lossless: true }).toBuffer());
  writeFileSync(path.join(base, "path", "x_2.tiff"), await raw(2).tiff().toBuffer());
  writeFileSync(path.join(base, "path", "x_1.png"), await raw(1).png().toBuffer());
  writeFileSync(path.join(base, "path", "x_3.gif"), await raw(3).gif().toBuffer()); // not a path suffix
  const provided = await parseProperty("real=@path", { baseDir: base });
  const images = provided.providedPath?.images as Buffer[];
  const firsts = await Promise.all(images.map(async (image) => (await pixels(image)).values[0]));
  assert.deepEqual(firsts, [1, 2, 10]);

  writeFileSync(path.join(base, "bad.webp"), "RIFF but not WebP");
  await assert.rejects(
    parseProperty("h=ed;mask=bad.webp", { baseDir: base }),
    /^Error: property 'h': mask '.*bad.webp' is not an image the client can read/,
  );
});

test("the example's --help lists the options and examples and exits 0", async () => {
  const { stdout } = await promisify(execFile)(process.execPath, [EXAMPLE, "--help"]);
  assert.match(stdout, /^usage: explain.js IMAGE --model NAME --property SPEC/);
  for (const words of ["--property SPEC: NAME=EDITOR[@VERSION]", "--max-steps N", "-h, --help", "examples:", "WebP", "exit codes:", "3  a property failed"]) {
    assert.ok(stdout.includes(words), `${words} missing from:\n${stdout}`);
  }
  await assert.rejects(promisify(execFile)(process.execPath, [EXAMPLE, "--model"]), (error: { code: number; stderr: string }) => {
    assert.equal(error.code, 2);
    assert.match(error.stderr, /^explain: error: /);
    return true;
  });
});
