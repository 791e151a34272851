/**
 * Attribution maps and their fidelity (`propscope.v1.AttributionService`): requests built from
 * friendly options (the Python SDK's `Client.attribute` / `evaluate_attribution` keywords,
 * camelCased), checked before anything is sent, and the streams' events gathered into typed
 * results whose maps are row-major Float32Arrays.
 */

import type { AttributeAccepted__Output } from "./generated/propscope/v1/AttributeAccepted";
import type { AttributeRequest } from "./generated/propscope/v1/AttributeRequest";
import type { AttributionMap } from "./generated/propscope/v1/AttributionMap";
import type { AttributionResult__Output } from "./generated/propscope/v1/AttributionResult";
import type { EvaOptions } from "./generated/propscope/v1/EvaOptions";
import type { EvaResult__Output } from "./generated/propscope/v1/EvaResult";
import type { EvaluateAttributionRequest } from "./generated/propscope/v1/EvaluateAttributionRequest";
import type { EvaluationAccepted__Output } from "./generated/propscope/v1/EvaluationAccepted";
import type { MetricResult__Output } from "./generated/propscope/v1/MetricResult";
import type { ModelRef } from "./generated/propscope/v1/ModelRef";
import type { Perturbation } from "./generated/propscope/v1/Perturbation";
import type { RiseOptions } from "./generated/propscope/v1/RiseOptions";
import type { SobolOptions } from "./generated/propscope/v1/SobolOptions";
import { encodeImage, type ImageInput } from "./images";

export type Method = "sobol" | "rise" | "eva";
/** EVA's bound propagation: CROWN-IBP (the server's default, never looser) or interval bounds. */
export type Bound = "crown" | "ibp";
export type Estimator = "jansen" | "homma" | "janon" | "glen_isaacs" | "saltelli";
/** Unset: the logit of a logits model, else the log-odds (the result says which). */
export type TargetScore = "probability" | "logit" | "log_odds";
export type PerturbationKind = "inpainting" | "blur" | "amplitude";
export type Baseline = "input_zero" | "black" | "mean_colour" | "blur";
export type Metric = "deletion" | "insertion" | "mu_fidelity" | "stability";

export const METRICS: readonly Metric[] = ["deletion", "insertion", "mu_fidelity", "stability"];

/** The method's options; 0 or unset means the server's default. */
export interface MethodOptions {
  /** "sobol" (the default), "rise" or "eva" (an open model with the `bounds` capability). */
  method?: Method;
  /** Cells per side (Sobol: 8, RISE: 7, EVA: 8). */
  gridSize?: number;
  /** Sobol: N, a power of two (32); N (g² + 2) forward passes. */
  nbDesign?: number;
  /** Sobol's total-order estimator (jansen). */
  estimator?: Estimator;
  /** Sobol: one factor per cell and colour channel. */
  perChannel?: boolean;
  /** Sobol: an Owen-scrambled design seeded by `seed` (default: Xplique's unscrambled one). */
  scrambled?: boolean;
  /** RISE: the number of masks (4000). */
  nbSamples?: number;
  /** RISE: the probability a cell is kept, in (0, 1) (0.5). */
  preservationProbability?: number;
  /** EVA: the l-inf radius as a fraction of the pixel range, in (0, 1] (8/255). */
  epsilon?: number;
  /** EVA: the bound propagation (crown). */
  bound?: Bound;
  /** EVA: a declared layer to verify from (hybrid: NOT guaranteed); unset: from the input. */
  hybridLayer?: string;
  /** EVA: points sampled in the ball, 1..65536 (256). */
  samples?: number;
}

export interface PerturbationOptions {
  /** How masked pixels change: inpainting (the default), blur or amplitude. */
  perturbation?: PerturbationKind;
  /** What masked pixels become: input_zero (the default), black, mean_colour or blur. */
  baseline?: Baseline;
  /** Blur radius in pixels of the model's input (0: 2% of its longer side). */
  blurSigma?: number;
}

/** The classifier and its target, shared by both RPCs. */
export interface ModelOptions {
  /** The image: encoded bytes or a file's path (`encodeImage`: other formats become PNG). */
  image: ImageInput;
  /** The classifier's Triton name. */
  model: string;
  modelVersion?: string;
  modelOutput?: string;
  /** The class to explain; unset: the class the model predicts for the image. */
  targetClass?: number;
  /** "probability" (the default) or "logit" of the target class. */
  targetScore?: TargetScore;
  /** Class names by index; unset: the model's own. */
  classLabels?: string[];
  /** A decimal string or a number (uint64). */
  seed?: string | number;
  requestId?: string;
}

export type AttributeOptions = ModelOptions & MethodOptions & PerturbationOptions;

/** A map as rows: `values[row * width + col]`. */
export interface MapArray {
  height: number;
  width: number;
  values: Float32Array;
}

export interface EvaluateOptions extends ModelOptions {
  /**
   * The map to score, at the image's size: a MapArray, or rows of numbers. Required unless
   * `metrics` is only stability.
   */
  explanation?: MapArray | number[][];
  /** Some of deletion, insertion, mu_fidelity, stability (default: the first three). */
  metrics?: Metric[];
  /** Deletion and insertion: steps of the curve (10). */
  steps?: number;
  /** Deletion and insertion: the fraction perturbed at the last step, in (0, 1] (1). */
  maxPercentagePerturbed?: number;
  /** Deletion, insertion and MuFidelity: what removed pixels become (input_zero). */
  baseline?: Baseline;
  /** MuFidelity: cells per side (9). */
  gridSize?: number;
  /** MuFidelity: fraction of cells per subset, in (0, 1) (0.2). */
  subsetPercent?: number;
  /** MuFidelity: subsets, one forward pass each (200). */
  nbSamples?: number;
  /** Stability: noise radius in (0, 1] (0.1). */
  radius?: number;
  /** Stability: noisy images (20). */
  stabilitySamples?: number;
  /** Stability: the method whose maps are recomputed, and how masked pixels change. */
  stabilityMethod?: MethodOptions;
  stabilityPerturbation?: PerturbationOptions;
}

const ESTIMATORS: Record<Estimator, string> = {
  jansen: "SOBOL_ESTIMATOR_JANSEN",
  homma: "SOBOL_ESTIMATOR_HOMMA",
  janon: "SOBOL_ESTIMATOR_JANON",
  glen_isaacs: "SOBOL_ESTIMATOR_GLEN_ISAACS",
  saltelli: "SOBOL_ESTIMATOR_SALTELLI",
};
const TARGET_SCORES: Record<TargetScore, string> = {
  probability: "TARGET_SCORE_PROBABILITY",
  logit: "TARGET_SCORE_LOGIT",
  log_odds: "TARGET_SCORE_LOG_ODDS",
};
const KINDS: Record<PerturbationKind, string> = {
  inpainting: "KIND_INPAINTING",
  blur: "KIND_BLUR",
  amplitude: "KIND_AMPLITUDE",
};
const BOUNDS: Record<Bound, string> = {
  crown: "BOUND_METHOD_CROWN",
  ibp: "BOUND_METHOD_IBP",
};
const BASELINES: Record<Baseline, string> = {
  input_zero: "BASELINE_INPUT_ZERO",
  black: "BASELINE_BLACK",
  mean_colour: "BASELINE_MEAN_COLOUR",
  blur: "BASELINE_BLUR",
};

function word<T extends string>(table: Record<T, string>, value: T | undefined, name: string) {
  if (value === undefined) return undefined;
  if (!Object.prototype.hasOwnProperty.call(table, value)) {
    throw new Error(`${name} must be one of ${Object.keys(table).join(", ")}, got '${value}'`);
  }
  return table[value];
}

export function counts(options: Record<string, unknown>, keys: string[]): void {
  for (const key of keys) {
    const value = options[key];
    if (value !== undefined && !(Number.isInteger(value) && (value as number) >= 0)) {
      throw new Error(`${key} must be an integer >= 0 (0: the server's default), got ${value}`);
    }
  }
}

export function fraction(name: string, value: number | undefined, closedRight: boolean): void {
  if (value === undefined) return;
  if (!((value > 0 && value < 1) || (closedRight && value === 1))) {
    throw new Error(`${name} must be in (0, ${closedRight ? "1]" : "1)"}, got ${value}`);
  }
}

export function modelRef(options: ModelOptions): ModelRef {
  if (!options.model) throw new Error("model must be a non-empty Triton model name");
  counts(options as unknown as Record<string, unknown>, ["targetClass"]);
  const labels = options.classLabels ?? [];
  if (!labels.every((label) => typeof label === "string" && label)) {
    throw new Error("classLabels must be non-empty strings, one per class index");
  }
  return {
    name: options.model,
    version: options.modelVersion ?? "",
    output: options.modelOutput ?? "",
    ...(options.targetClass === undefined
      ? { predictedClass: true }
      : { targetClass: options.targetClass }),
    classLabels: labels,
  };
}

/** `{ sobol }`, `{ rise }` or `{ eva }`: the method oneof of a request or StabilityOptions. */
function methodMessage(
  options: MethodOptions,
): { sobol: SobolOptions } | { rise: RiseOptions } | { eva: EvaOptions } {
  counts(options as Record<string, unknown>, ["gridSize", "nbDesign", "nbSamples", "samples"]);
  const method = options.method ?? "sobol";
  const evaGiven =
    options.epsilon !== undefined ||
    options.bound !== undefined ||
    options.hybridLayer ||
    options.samples;
  if (method !== "eva" && evaGiven) {
    throw new Error("epsilon, bound, hybridLayer and samples are EVA options (method: \"eva\")");
  }
  if (method === "eva") return { eva: evaMessage(options) };
  if (method === "sobol") {
    if (options.nbSamples || options.preservationProbability !== undefined) {
      throw new Error("nbSamples and preservationProbability are RISE options");
    }
    const n = options.nbDesign ?? 0;
    if (n && (n & (n - 1)) !== 0) throw new Error(`nbDesign must be a power of two, got ${n}`);
    return {
      sobol: {
        gridSize: options.gridSize ?? 0,
        nbDesign: n,
        estimator: (word(ESTIMATORS, options.estimator, "estimator") ??
          "SOBOL_ESTIMATOR_UNSPECIFIED") as SobolOptions["estimator"],
        perChannel: options.perChannel ?? false,
        scrambled: options.scrambled ?? false,
      },
    };
  }
  if (method === "rise") {
    if (
      options.nbDesign ||
      options.estimator !== undefined ||
      options.perChannel ||
      options.scrambled
    ) {
      throw new Error("nbDesign, estimator, perChannel and scrambled are Sobol options");
    }
    fraction("preservationProbability", options.preservationProbability, false);
    return {
      rise: {
        gridSize: options.gridSize ?? 0,
        nbSamples: options.nbSamples ?? 0,
        ...(options.preservationProbability === undefined
          ? {}
          : { preservationProbability: options.preservationProbability }),
      },
    };
  }
  throw new Error(`method must be sobol, rise or eva, got '${method}'`);
}

/** EVA's options, checked against the ranges attribution.proto fixes. */
function evaMessage(options: MethodOptions): EvaOptions {
  const sobolGiven =
    options.nbDesign || options.estimator !== undefined || options.perChannel || options.scrambled;
  if (sobolGiven) {
    throw new Error("nbDesign, estimator, perChannel and scrambled are Sobol options, not EVA's");
  }
  if (options.nbSamples || options.preservationProbability !== undefined) {
    throw new Error(
      "nbSamples and preservationProbability are RISE options; EVA's sampled points are samples",
    );
  }
  const grid = options.gridSize ?? 0;
  if (grid && !(grid >= 2 && grid <= 32)) {
    throw new Error(`gridSize must be in 2..32 (0: the server's default, 8), got ${grid}`);
  }
  fraction("epsilon", options.epsilon, true);
  const samples = options.samples ?? 0;
  if (samples > 65536) throw new Error(`samples must be in 1..65536 (256), got ${samples}`);
  if (options.hybridLayer !== undefined && typeof options.hybridLayer !== "string") {
    throw new Error("hybridLayer must be a declared layer's name (a string)");
  }
  return {
    gridSize: grid,
    ...(options.epsilon === undefined ? {} : { epsilon: options.epsilon }),
    bound: (word(BOUNDS, options.bound, "bound") ??
      "BOUND_METHOD_UNSPECIFIED") as EvaOptions["bound"],
    hybridLayer: options.hybridLayer ?? "",
    samples,
  };
}

/** EVA bounds logit margins over an epsilon ball: no other target score, no masked pixels. */
function evaRequestChecks(options: AttributeOptions): void {
  if (options.targetScore !== undefined && options.targetScore !== "logit") {
    throw new Error(`targetScore must be logit (or unset) for EVA, got '${options.targetScore}'`);
  }
  if (
    options.perturbation !== undefined ||
    options.baseline !== undefined ||
    options.blurSigma !== undefined
  ) {
    throw new Error(
      "perturbation, baseline and blurSigma set how Sobol and RISE mask pixels; EVA perturbs " +
        "every pixel within epsilon: leave them out",
    );
  }
}

function perturbationMessage(options: PerturbationOptions): Perturbation {
  const sigma = options.blurSigma ?? 0;
  if (!(sigma >= 0)) throw new Error(`blurSigma must be >= 0, got ${sigma}`);
  return {
    kind: (word(KINDS, options.perturbation, "perturbation") ??
      "KIND_UNSPECIFIED") as Perturbation["kind"],
    baseline: baselineEnum(options.baseline),
    blurSigma: sigma,
  };
}

function baselineEnum(baseline: Baseline | undefined): Perturbation["baseline"] {
  return (word(BASELINES, baseline, "baseline") ??
    "BASELINE_UNSPECIFIED") as Perturbation["baseline"];
}

export function targetScoreEnum(value: TargetScore | undefined) {
  return (word(TARGET_SCORES, value, "targetScore") ??
    "TARGET_SCORE_UNSPECIFIED") as AttributeRequest["targetScore"];
}

/**
 * The AttributeRequest for `options`, its image converted as `encodeImage` does; rejects with
 * an Error naming the option to fix (the options are checked before the image is read).
 */
export async function buildAttributeRequest(options: AttributeOptions): Promise<AttributeRequest> {
  if (options.method === "eva") evaRequestChecks(options);
  return {
    requestId: options.requestId ?? "",
    model: modelRef(options),
    ...methodMessage(options),
    targetScore: targetScoreEnum(options.targetScore),
    perturbation: perturbationMessage(options),
    seed: String(options.seed ?? 0),
    image: await encodeImage(options.image),
  };
}

/** A map message from a MapArray or rows of finite numbers. */
export function mapMessage(map: MapArray | number[][], name = "explanation"): AttributionMap {
  let height: number;
  let width: number;
  let values: number[];
  if (Array.isArray(map)) {
    height = map.length;
    width = height ? map[0].length : 0;
    if (!map.every((row) => Array.isArray(row) && row.length === width)) {
      throw new Error(`${name} must be rows of equal length`);
    }
    values = map.flat();
  } else {
    ({ height, width } = map);
    values = Array.from(map.values);
    if (values.length !== height * width) {
      throw new Error(`${name} holds ${values.length} values, not ${height} x ${width}`);
    }
  }
  if (!height || !width) throw new Error(`${name} must be a non-empty height x width map`);
  if (!values.every(Number.isFinite)) throw new Error(`${name} holds NaN or infinite values`);
  return { height, width, values };
}

/**
 * The EvaluateAttributionRequest for `options`, its image converted as `encodeImage` does;
 * rejects with an Error naming the option to fix (the options are checked before the image is
 * read).
 */
export async function buildEvaluateAttributionRequest(
  options: EvaluateOptions,
): Promise<EvaluateAttributionRequest> {
  const metrics = [...new Set(options.metrics ?? ["deletion", "insertion", "mu_fidelity"])];
  const unknown = metrics.filter((name) => !(METRICS as readonly string[]).includes(name));
  if (unknown.length || !metrics.length) {
    throw new Error(`metrics must be some of ${METRICS.join(", ")}, got [${options.metrics}]`);
  }
  counts(options as unknown as Record<string, unknown>, [
    "steps",
    "gridSize",
    "nbSamples",
    "stabilitySamples",
  ]);
  fraction("maxPercentagePerturbed", options.maxPercentagePerturbed, true);
  fraction("subsetPercent", options.subsetPercent, false);
  fraction("radius", options.radius, true);
  const onlyStability = metrics.length === 1 && metrics[0] === "stability";
  if (options.explanation === undefined && !onlyStability) {
    throw new Error(`explanation (the map to score) is required for ${metrics.join(", ")}`);
  }
  const curve = {
    steps: options.steps ?? 0,
    ...(options.maxPercentagePerturbed === undefined
      ? {}
      : { maxPercentagePerturbed: options.maxPercentagePerturbed }),
    baseline: baselineEnum(options.baseline),
  };
  const request: EvaluateAttributionRequest = {
    requestId: options.requestId ?? "",
    model: modelRef(options),
    targetScore: targetScoreEnum(options.targetScore),
    seed: String(options.seed ?? 0),
  };
  if (options.explanation !== undefined) request.explanation = mapMessage(options.explanation);
  if (metrics.includes("deletion")) request.deletion = curve;
  if (metrics.includes("insertion")) request.insertion = curve;
  if (metrics.includes("mu_fidelity")) {
    request.muFidelity = {
      gridSize: options.gridSize ?? 0,
      ...(options.subsetPercent === undefined ? {} : { subsetPercent: options.subsetPercent }),
      nbSamples: options.nbSamples ?? 0,
      baseline: baselineEnum(options.baseline),
    };
  }
  if (metrics.includes("stability")) {
    request.stability = {
      ...(options.radius === undefined ? {} : { radius: options.radius }),
      nbSamples: options.stabilitySamples ?? 0,
      ...methodMessage(options.stabilityMethod ?? {}),
      perturbation: perturbationMessage(options.stabilityPerturbation ?? {}),
    };
  }
  request.image = await encodeImage(options.image);
  return request;
}

export type EvaDecision = "certified" | "not_robust" | "undecided";

const EVA_DECISIONS: Record<string, EvaDecision> = {
  EVA_DECISION_CERTIFIED: "certified",
  EVA_DECISION_NOT_ROBUST: "not_robust",
  EVA_DECISION_UNDECIDED: "undecided",
};

/** What an EVA map rests on (docs/eva.md). */
export interface EvaBounds {
  /** Verified from the input; false for a hybrid from `hybridLayer` (its layer box is sampled). */
  guaranteed: boolean;
  /** "verified (guaranteed)" or "hybrid from LAYER: NOT guaranteed". */
  guarantee: string;
  bound: Bound;
  /** The radius as a fraction of the pixel range, and per input channel in input units. */
  epsilon: number;
  epsilonInput: number[];
  hybridLayer: string;
  /** Upper bound of the adversarial overlap over the ball (every region perturbed). */
  overlapBound: number;
  /** The highest overlap among the sampled points and an attack's iterates: a lower bound of
   * the true overlap. */
  sampledOverlap: number;
  samples: number;
  adversaryClass: number;
  adversaryLabel: string;
  /** The bound with each cell held fixed, row-major g x g (the grid is overlapBound minus it). */
  regionBounds: Float64Array;
  /** guaranteed and overlapBound < 0: no input of the ball makes another class reach the
   * target (a hybrid is never certified). */
  certified: boolean;
  /**
   * What the overlaps decide, as the server decides it for every client: "certified" (a
   * verified bound below 0), "not_robust" (a sampled point reaches another class), else
   * "undecided": the true overlap lies anywhere between sampledOverlap and overlapBound (or a
   * hybrid's bound, not guaranteed, is below 0). An older server's unset decision reads as
   * "undecided", never as certified.
   */
  decision: EvaDecision;
  /** The decision in words, with why (the gap, and what may close it). */
  verdict: string;
  boundPasses: number;
  /** uint64, a decimal string. */
  samplePasses: string;
}

/** One attribution map with the plan the server accepted. */
export interface Attribution {
  requestId: string;
  method: Method;
  /** Float32 at the image's size. */
  map: MapArray;
  /** Per grid cell, over the model's input (Sobol: total-order indices). */
  grid: MapArray;
  /** Per-channel Sobol only: grid x grid x 3 values, channel last; else null. */
  channelGrid: Float32Array | null;
  /** The plan: resolved options, perturbation (also in words; unset for EVA), preprocessing,
   * warnings. */
  accepted: AttributeAccepted__Output;
  forwardPasses: number;
  cacheHit: boolean;
  originalScore: number;
  targetClass: number;
  targetLabel: string;
  targetScore: string;
  totalMs: number;
  /** EVA only: the bounds the map rests on; null for Sobol and RISE. */
  eva: EvaBounds | null;
}

/** The fidelity of one map: the accepted plan and a result per metric, in server order. */
export interface Evaluation {
  requestId: string;
  accepted: EvaluationAccepted__Output;
  results: MetricResult__Output[];
}

/** A MapArray from a map message; throws when its values do not fill it. */
export function mapArray(message: AttributionMap | null | undefined, name = "map"): MapArray {
  const height = message?.height ?? 0;
  const width = message?.width ?? 0;
  const values = Float32Array.from((message?.values ?? []).map(Number));
  if (values.length !== height * width) {
    throw new Error(`${name}: ${values.length} values for ${height} x ${width}; a malformed map`);
  }
  return { height, width, values };
}

/** The typed attribution of a finished Attribute stream's plan and result. */
export function attributionFrom(
  requestId: string,
  accepted: AttributeAccepted__Output,
  result: AttributionResult__Output,
): Attribution {
  const grid = mapArray(result.grid, "grid");
  let channelGrid: Float32Array | null = null;
  if (result.channelGrid.length) {
    if (result.channelGrid.length !== grid.values.length * 3) {
      throw new Error(`channelGrid: ${result.channelGrid.length} values for a grid x grid x 3 map`);
    }
    channelGrid = Float32Array.from(result.channelGrid);
  }
  const method: Method =
    accepted.method === "rise" || accepted.method === "eva" ? accepted.method : "sobol";
  if (method === "eva" && !result.eva) throw new Error("an EVA map without its bounds (eva)");
  return {
    requestId,
    method,
    map: mapArray(result.map),
    grid,
    channelGrid,
    accepted,
    forwardPasses: result.forwardPasses,
    cacheHit: result.cacheHit,
    originalScore: result.originalScore,
    targetClass: result.targetClass,
    targetLabel: result.targetLabel || accepted.targetLabel,
    targetScore: result.targetScore,
    totalMs: result.totalMs,
    eva: method === "eva" && result.eva ? evaBounds(result.eva, grid.values.length) : null,
  };
}

function evaBounds(message: EvaResult__Output, cells: number): EvaBounds {
  if (message.regionBounds.length !== cells) {
    throw new Error(`eva.regionBounds: ${message.regionBounds.length} values for ${cells} cells`);
  }
  return {
    guaranteed: message.guaranteed,
    guarantee: message.guaranteed
      ? "verified (guaranteed)"
      : `hybrid from ${message.hybridLayer}: NOT guaranteed`,
    bound: message.bound === "BOUND_METHOD_IBP" ? "ibp" : "crown",
    epsilon: message.epsilon,
    epsilonInput: message.epsilonInput.map(Number),
    hybridLayer: message.hybridLayer,
    overlapBound: message.overlapBound,
    sampledOverlap: message.sampledOverlap,
    samples: message.samples,
    adversaryClass: message.adversaryClass,
    adversaryLabel: message.adversaryLabel,
    regionBounds: Float64Array.from(message.regionBounds.map(Number)),
    certified: message.certified,
    decision: EVA_DECISIONS[message.decision] ?? "undecided",
    verdict: message.verdict,
    boundPasses: message.boundPasses,
    samplePasses: String(message.samplePasses),
  };
}
