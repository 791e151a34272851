/**
 * The Python CLI's text syntax for a property, so that the same `--property` strings work in
 * both clients (client/node/test/property-syntax-cases.json holds the cases both test):
 *
 *   NAME=EDITOR[@VERSION][:key=value,key=value...][;REGION]
 *   NAME=@FOLDER            a provided path: FOLDER's images in natural order are x_1..x_N
 *   REGION: mask=FILE | box=LEFT,TOP,RIGHT,BOTTOM (fractions 0-1) | box_px=... (pixels)
 */

import { readdir, stat } from "node:fs/promises";
import path from "node:path";

import type { Property } from "./generated/propscope/v1/Property";
import { encodeImage, encodeMask, FOLDER_IMAGE_SUFFIXES } from "./images";

export const PROPERTY_SYNTAX = "NAME=EDITOR[@VERSION][:key=value,...][;REGION] or NAME=@FOLDER";
export const REGION_SYNTAX =
  "mask=FILE (or mask=@FILE), box=LEFT,TOP,RIGHT,BOTTOM (fractions 0-1) or box_px=... (pixels)";

// A comma only separates parameters when the next item looks like `key=`, so values such as
// prompts may contain commas ("prompt=a red car, at night,steps=4" has two parameters).
const PARAMETER_SEPARATOR = /,(?=\s*[A-Za-z_][\w.\-]*\s*=)/;
// A semicolon starts the region only when a region key follows, so values may hold ';' too.
const REGION_SEPARATOR = /;(?=\s*(?:mask|box|box_px)\s*=)/;
// Plain decimal numbers only, as the Python SDK reads them.
const NUMBER = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

/** A region as the text spells it, before any file is read. */
export type RegionText = { mask: string } | { box: number[] } | { box_px: number[] };

/** What a property's text says, before any file is read (the parity cases' form). */
export interface PropertyText {
  name: string;
  editor: string | null;
  version: string;
  parameters: Record<string, string>;
  region: RegionText | null;
  folder: string | null;
}

export interface ParseOptions {
  /** What relative mask files and folders are relative to (default: the working folder). */
  baseDir?: string;
}

/** Reads a property's text without opening any file; throws an Error naming the problem. */
export function splitProperty(text: string): PropertyText {
  const invalid = (why: string) => new Error(`invalid property '${text}': ${why}`);
  const [namePart, rest] = splitOnce(text, "=");
  const name = namePart.trim();
  if (rest === undefined) throw invalid(`missing '=' (expected ${PROPERTY_SYNTAX})`);
  if (!name) throw invalid(`empty name (expected ${PROPERTY_SYNTAX})`);
  const [source, ...regions] = rest.split(REGION_SEPARATOR);
  if (regions.length > 1) throw invalid("give at most one region (mask, box or box_px)");
  const region = regions.length ? splitRegion(regions[0], invalid) : null;
  if (source.trim().startsWith("@")) {
    const folder = source.trim().slice(1).trim();
    if (!folder) throw invalid("empty folder after '@' (expected NAME=@FOLDER)");
    if (region) throw invalid("a region applies to editors only, not to a provided path");
    return { name, editor: null, version: "", parameters: {}, region: null, folder };
  }
  const [editorPart, parametersPart] = splitOnce(source, ":");
  const [editorName, versionPart] = splitOnce(editorPart.trim(), "@");
  const editor = editorName.trim();
  const version = (versionPart ?? "").trim();
  if (!editor) throw invalid(`empty editor (expected ${PROPERTY_SYNTAX})`);
  if (versionPart !== undefined && !version) throw invalid("empty editor version after '@'");
  const parameters = parametersPart === undefined ? {} : parseParameters(parametersPart, invalid);
  return { name, editor, version, parameters, region, folder: null };
}

/**
 * Parses e.g. `object_hue=procedural:operation=hue,region=object;box=0.1,0.1,0.9,0.9` into a
 * `propscope.v1.Property`, reading its mask file or provided-path folder with the Python SDK's
 * conversions (`encodeMask`, `encodeImage`: WebP, GIF, TIFF, AVIF and BMP become PNG). Names,
 * editors and keys are trimmed; parameter values are kept as written. Rejects with an Error
 * naming the problem.
 */
export async function parseProperty(text: string, options: ParseOptions = {}): Promise<Property> {
  const spec = splitProperty(text);
  const base = options.baseDir ?? process.cwd();
  const failed = (why: string) => new Error(`property '${spec.name}': ${why}`);
  if (spec.folder !== null) {
    const images = await folderImages(path.resolve(base, spec.folder), failed);
    return { name: spec.name, providedPath: { images } };
  }
  const property: Property = {
    name: spec.name,
    editor: { model: spec.editor ?? "", version: spec.version, parameters: spec.parameters },
  };
  if (spec.region && "mask" in spec.region) {
    property.region = { mask: await withName(encodeMask(path.resolve(base, spec.region.mask)), failed) };
  } else if (spec.region) {
    const pixels = "box_px" in spec.region;
    const [left, top, right, bottom] = "box_px" in spec.region ? spec.region.box_px : spec.region.box;
    property.region = { box: { left, top, right, bottom, pixels } };
  }
  return property;
}

function splitRegion(text: string, invalid: (why: string) => Error): RegionText {
  const [keyPart, valuePart] = splitOnce(text, "=");
  const key = keyPart.trim();
  const value = (valuePart ?? "").trim();
  if (!value) throw invalid(`empty ${key} (expected ${REGION_SYNTAX})`);
  if (key === "mask") {
    // mask=@FILE reads as mask=FILE: '@' marks files elsewhere in the syntax.
    const file = value.startsWith("@") ? value.slice(1).trim() : value;
    if (!file) throw invalid(`empty mask (expected ${REGION_SYNTAX})`);
    return { mask: file };
  }
  const parts = value.split(",").map((part) => part.trim());
  if (parts.length !== 4 || !parts.every((part) => NUMBER.test(part))) {
    throw invalid(`${key}=${value} must be 4 numbers LEFT,TOP,RIGHT,BOTTOM`);
  }
  const numbers = parts.map(Number);
  const pixels = key === "box_px";
  if (Math.min(...numbers) < 0 || (!pixels && Math.max(...numbers) > 1)) {
    const unit = pixels ? "pixels >= 0" : "fractions in [0, 1] (box_px for pixels)";
    throw invalid(`box ${value}: the values must be ${unit}`);
  }
  if (numbers[0] >= numbers[2] || numbers[1] >= numbers[3]) {
    throw invalid(`box ${value}: needs LEFT < RIGHT and TOP < BOTTOM`);
  }
  return pixels ? { box_px: numbers } : { box: numbers };
}

function parseParameters(
  text: string,
  invalid: (why: string) => Error,
): Record<string, string> {
  if (!text.trim()) throw invalid("no parameters after ':'");
  if (text.trimEnd().endsWith(",") || /,\s*,/.test(text)) {
    throw invalid("empty parameter between commas");
  }
  // A Map, not an object literal: keys such as "constructor" must not meet Object's prototype.
  const parameters = new Map<string, string>();
  for (const item of text.split(PARAMETER_SEPARATOR)) {
    const [keyPart, value] = splitOnce(item, "=");
    const key = keyPart.trim();
    if (value === undefined || !key) throw invalid(`parameter '${item.trim()}' is not key=value`);
    if (parameters.has(key)) throw invalid(`parameter '${key}' given twice`);
    parameters.set(key, value);
  }
  return Object.fromEntries(parameters);
}

/** Sort key parts: digit runs compare as numbers, other text case-insensitively (as Python). */
function naturalKey(name: string): [number, string][] {
  return name
    .toLowerCase()
    .split(/(\d+)/)
    .filter((part) => part !== "")
    .map((part) => (/^\d+$/.test(part) ? [0, String(BigInt(part)).padStart(20, "0")] : [1, part]));
}

/** Orders `x_2.png` before `x_10.png`, ties broken by the name itself. */
export function naturalCompare(a: string, b: string): number {
  const [keyA, keyB] = [naturalKey(a), naturalKey(b)];
  for (let i = 0; i < Math.min(keyA.length, keyB.length); i++) {
    const [kindA, textA] = keyA[i];
    const [kindB, textB] = keyB[i];
    if (kindA !== kindB) return kindA - kindB;
    if (textA !== textB) return textA < textB ? -1 : 1;
  }
  if (keyA.length !== keyB.length) return keyA.length - keyB.length;
  return a < b ? -1 : a > b ? 1 : 0;
}

async function folderImages(folder: string, failed: (why: string) => Error): Promise<Buffer[]> {
  const isFolder = await stat(folder).then((found) => found.isDirectory(), () => false);
  if (!isFolder) throw failed(`'${folder}' is not a folder`);
  const candidates = (await readdir(folder)).filter(
    (name) => !name.startsWith(".") && FOLDER_IMAGE_SUFFIXES.includes(path.extname(name).toLowerCase()),
  );
  // Files or links to files, as Python's Path.is_file.
  const isFile = await Promise.all(
    candidates.map((name) => stat(path.join(folder, name)).then((found) => found.isFile(), () => false)),
  );
  const names = candidates.filter((_, index) => isFile[index]).sort(naturalCompare);
  if (!names.length) {
    throw failed(`folder '${folder}' holds no image (${FOLDER_IMAGE_SUFFIXES.join(", ")})`);
  }
  return Promise.all(names.map((name) => withName(encodeImage(path.join(folder, name)), failed)));
}

/** The image, or its error prefixed with the property's name. */
async function withName(image: Promise<Buffer>, failed: (why: string) => Error): Promise<Buffer> {
  try {
    return await image;
  } catch (error) {
    throw failed((error as Error).message);
  }
}

/** Python's `str.partition`: the text before the first `separator` and the rest, if any. */
function splitOnce(text: string, separator: string): [string, string | undefined] {
  const at = text.indexOf(separator);
  return at < 0 ? [text, undefined] : [text.slice(0, at), text.slice(at + separator.length)];
}
