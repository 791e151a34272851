/**
 * Building an ExplainRequest from friendly options, checked before anything is sent (the
 * Python SDK's `Client.explain` keywords, camelCased).
 */

import type { ExplainRequest } from "./generated/propscope/v1/ExplainRequest";
import type { Property } from "./generated/propscope/v1/Property";
import { encodeImage, type ImageInput } from "./images";
import { parseProperty, type ParseOptions } from "./properties";

export type OutputKind = "logits" | "probabilities";
export type ResizeMode = "squash" | "center_crop" | "letterbox";
export type PathMode = "adaptive" | "fixed";

/** Overrides, field by field, what the model declares in its config.pbtxt. */
export interface PreprocessingOptions {
  /** Per-channel mean subtracted after scaling to [0, 1]: 3 numbers. */
  mean?: number[];
  /** Per-channel std divided by: 3 positive numbers. */
  std?: number[];
  /** What the model outputs; unset: declared by the model, else detected. */
  outputKind?: OutputKind;
  /** How an image of another size becomes the model's input; unset: the model's, else squash. */
  resize?: ResizeMode;
}

export interface ExplainOptions {
  /** The image: encoded bytes or a file's path (`encodeImage`: other formats become PNG). */
  image: ImageInput;
  /** The classifier's Triton name. */
  model: string;
  modelVersion?: string;
  modelOutput?: string;
  /** Property texts (`parseProperty`'s syntax) or Property messages; names unique. */
  properties: (string | Property)[];
  /** Where relative mask files and provided-path folders are (default: the working folder). */
  baseDir?: string;
  /** The class to follow; unset: the class the model predicts for the original image. */
  targetClass?: number;
  steps?: number;
  samples?: number;
  /** A decimal string or a number (uint64). */
  seed?: string | number;
  permutations?: number;
  alpha?: number;
  minProbabilityChange?: number;
  returnPathImages?: boolean;
  /** "adaptive" (the server's default: lengthened while the test cannot decide) or "fixed". */
  pathMode?: PathMode;
  /** Adaptive paths: the longest path, steps x a power of two (unset: the server's limit). */
  maxSteps?: number;
  preprocessing?: PreprocessingOptions;
  /** Class names by index; unset: the model's own. */
  classLabels?: string[];
  requestId?: string;
}

const OUTPUT_KINDS = { logits: "OUTPUT_KIND_LOGITS", probabilities: "OUTPUT_KIND_PROBABILITIES" } as const;
const RESIZE_MODES = {
  squash: "RESIZE_MODE_SQUASH",
  center_crop: "RESIZE_MODE_CENTER_CROP",
  letterbox: "RESIZE_MODE_LETTERBOX",
} as const;
const PATH_MODES = { adaptive: "PATH_MODE_ADAPTIVE", fixed: "PATH_MODE_FIXED" } as const;

/**
 * The ExplainRequest for `options`, its image and property files read and converted as the
 * Python SDK does; rejects with an Error naming the option to fix.
 */
export async function buildExplainRequest(options: ExplainOptions): Promise<ExplainRequest> {
  if (!options.model) throw new Error("model must be a non-empty Triton model name");
  const parse: ParseOptions = { baseDir: options.baseDir };
  const properties = await Promise.all(
    options.properties.map((item) => (typeof item === "string" ? parseProperty(item, parse) : item)),
  );
  if (!properties.length) throw new Error("at least one property is required");
  const names = new Set<string>();
  for (const { name } of properties) {
    if (names.has(name ?? "")) throw new Error(`property name '${name}' is given twice`);
    names.add(name ?? "");
  }
  for (const key of ["steps", "samples", "permutations", "maxSteps", "targetClass"] as const) {
    const value = options[key];
    if (value !== undefined && !(Number.isInteger(value) && value >= 0)) {
      throw new Error(`${key} must be an integer >= 0, got ${value}`);
    }
  }
  if (options.pathMode !== undefined && !(options.pathMode in PATH_MODES)) {
    throw new Error(`pathMode must be adaptive or fixed, got '${options.pathMode}'`);
  }
  if (options.pathMode === "fixed" && options.maxSteps) {
    throw new Error("maxSteps applies to adaptive paths, not to pathMode 'fixed'");
  }
  if (options.maxSteps && options.steps && options.maxSteps < options.steps) {
    throw new Error(`maxSteps (${options.maxSteps}) must be at least steps (${options.steps})`);
  }
  const labels = options.classLabels ?? [];
  if (!labels.every((label) => typeof label === "string" && label)) {
    throw new Error("classLabels must be non-empty strings, one per class index");
  }
  return {
    requestId: options.requestId ?? "",
    image: await encodeImage(options.image),
    model: {
      name: options.model,
      version: options.modelVersion ?? "",
      output: options.modelOutput ?? "",
      ...(options.targetClass === undefined
        ? { predictedClass: true }
        : { targetClass: options.targetClass }),
      preprocessing: preprocessingMessage(options.preprocessing ?? {}),
      classLabels: labels,
    },
    properties,
    steps: options.steps ?? 0,
    samples: options.samples ?? 0,
    seed: String(options.seed ?? 0),
    permutations: options.permutations ?? 0,
    alpha: options.alpha ?? 0,
    ...(options.minProbabilityChange === undefined
      ? {}
      : { minProbabilityChange: options.minProbabilityChange }),
    returnPathImages: options.returnPathImages ?? false,
    pathMode: options.pathMode ? PATH_MODES[options.pathMode] : "PATH_MODE_UNSPECIFIED",
    maxSteps: options.maxSteps ?? 0,
  };
}

function preprocessingMessage(options: PreprocessingOptions) {
  for (const key of ["mean", "std"] as const) {
    const values = options[key];
    if (values === undefined) continue;
    if (values.length !== 3 || !values.every(Number.isFinite)) {
      throw new Error(`preprocessing ${key} must be 3 numbers (one per RGB channel), got [${values}]`);
    }
    if (key === "std" && Math.min(...values) <= 0) {
      throw new Error(`preprocessing std must be positive, got [${values}]`);
    }
  }
  if (options.outputKind !== undefined && !(options.outputKind in OUTPUT_KINDS)) {
    throw new Error(`preprocessing outputKind must be logits or probabilities, got '${options.outputKind}'`);
  }
  if (options.resize !== undefined && !(options.resize in RESIZE_MODES)) {
    throw new Error(
      `preprocessing resize must be squash, center_crop or letterbox, got '${options.resize}'`,
    );
  }
  return {
    mean: options.mean ?? [],
    std: options.std ?? [],
    outputKind: options.outputKind ? OUTPUT_KINDS[options.outputKind] : "OUTPUT_KIND_UNSPECIFIED",
    resize: options.resize ? RESIZE_MODES[options.resize] : "RESIZE_MODE_UNSPECIFIED",
  } as const;
}
