/**
 * Causal explanatory graphs (`propscope.v1.CausalGraphService.BuildGraph`): the request built
 * from friendly options (the Python SDK's `Client.graph` keywords, camelCased), checked before
 * anything is sent, and the stream's events gathered into one GraphResult.
 */

import { counts, fraction, modelRef, type ModelOptions } from "./attribution";
import type { BuildGraphRequest } from "./generated/propscope/v1/BuildGraphRequest";
import type { EdgeResult__Output } from "./generated/propscope/v1/EdgeResult";
import type { GraphAccepted__Output } from "./generated/propscope/v1/GraphAccepted";
import type { GraphDone__Output } from "./generated/propscope/v1/GraphDone";
import type { NodeResult__Output } from "./generated/propscope/v1/NodeResult";
import type { Repair__Output } from "./generated/propscope/v1/Repair";
import type { TaskGraph__Output } from "./generated/propscope/v1/TaskGraph";
import { encodeImage, type ImageInput } from "./images";
import { parseProperty } from "./properties";
import type { Property } from "./generated/propscope/v1/Property";

export type GraphBaseline = "mean" | "zero";

export interface GraphOptions extends Omit<ModelOptions, "image" | "targetScore"> {
  /** One image or several (encoded bytes or files' paths). */
  images: ImageInput | ImageInput[];
  /** Layers to graph, as the model declares them (ModelInfo.layers); unset: all. */
  layers?: string[];
  /** Intervention steps; 0 or unset: the server's default (10). */
  steps?: number;
  /** What a channel moves toward: "mean" (the default) or "zero". */
  baseline?: GraphBaseline;
  /** The mean baseline's reference set (8..256 images) when the model declares no means. */
  referenceImages?: ImageInput[];
  alpha?: number;
  permutations?: number;
  /** The smallest |p(1) - p(0)| of a relevant (kept) node, and a tenth of it an edge's
   * |pathEffect|; unset: 0.05. Lower it on a saturated model (see `warnings`). */
  minProbabilityChange?: number;
  nodesPerLayer?: number;
  maxEdges?: number;
  /** Task graph: the share of images a node or edge must be relevant (kept) on, (0, 1]. */
  minShare?: number;
  bootstrap?: number;
  /** A Property or the property syntax (`NAME=EDITOR:key=value`): ask for a repair. */
  repairProperty?: Property | string;
  /** The largest share of channels the repair ablates, (0, 0.5]. */
  repairMaxShare?: number;
}

/** A node is kept (drawn, joined by edges, counted by the task graph) when `relevant`:
 * significant and |probabilityChange| >= minProbabilityChange; `significant` alone is only
 * the test (a saturated image's channels are orderly however little they move p). The SDK's
 * `GraphResult.kept_nodes(i)`. */
export type GraphNode = NodeResult__Output;
/** Kept when `relevant`: significant and |pathEffect| >= 0.1 * minProbabilityChange
 * (the SDK's `GraphResult.kept_edges(i)`). */
export type GraphEdge = EdgeResult__Output;
export type TaskGraph = TaskGraph__Output;
export type GraphRepair = Repair__Output;

/** A finished BuildGraph call: the plan, every image's nodes and edges, the task graph (more
 * than one image) and the repair (when asked), and the end. */
export interface GraphResult {
  requestId: string;
  accepted: GraphAccepted__Output;
  nodes: GraphNode[];
  edges: GraphEdge[];
  taskGraph: TaskGraph | null;
  repair: GraphRepair | null;
  done: GraphDone__Output;
  /** The plan's warnings (accepted), then the finished graph's (done: per image, e.g. "image
   * 0: the target probability is 1 - 8.6e-12; ... no node is relevant ..."). */
  warnings: string[];
}

const BASELINES: Record<GraphBaseline, BuildGraphRequest["baseline"]> = {
  mean: "GRAPH_BASELINE_MEAN",
  zero: "GRAPH_BASELINE_ZERO",
};

/** The BuildGraphRequest of `options`; throws on a bad option before anything is sent. */
export async function buildGraphRequest(options: GraphOptions): Promise<BuildGraphRequest> {
  counts(options as unknown as Record<string, unknown>, [
    "steps",
    "permutations",
    "nodesPerLayer",
    "maxEdges",
    "bootstrap",
  ]);
  if (options.alpha !== undefined && options.alpha !== 0) fraction("alpha", options.alpha, false);
  fraction("minShare", options.minShare, true);
  if (
    options.repairMaxShare !== undefined &&
    !(options.repairMaxShare > 0 && options.repairMaxShare <= 0.5)
  ) {
    throw new Error(`repairMaxShare must be in (0, 0.5], got ${options.repairMaxShare}`);
  }
  const baseline = options.baseline ?? "mean";
  if (!Object.prototype.hasOwnProperty.call(BASELINES, baseline)) {
    throw new Error(`baseline must be one of mean, zero, got '${baseline}'`);
  }
  const images = Array.isArray(options.images) ? options.images : [options.images];
  if (!images.length) throw new Error("at least one image is required");
  const repair =
    typeof options.repairProperty === "string"
      ? await parseProperty(options.repairProperty)
      : options.repairProperty;
  return {
    requestId: options.requestId ?? "",
    images: await Promise.all(images.map((image) => encodeImage(image))),
    model: modelRef({ ...options, image: Buffer.alloc(0) }),
    layers: options.layers ?? [],
    steps: options.steps ?? 0,
    baseline: BASELINES[baseline],
    referenceImages: await Promise.all((options.referenceImages ?? []).map((i) => encodeImage(i))),
    alpha: options.alpha ?? 0,
    permutations: options.permutations ?? 0,
    minProbabilityChange: options.minProbabilityChange,
    nodesPerLayer: options.nodesPerLayer ?? 0,
    maxEdges: options.maxEdges ?? 0,
    minShare: options.minShare,
    bootstrap: options.bootstrap ?? 0,
    seed: String(options.seed ?? 0),
    repairProperty: repair,
    repairMaxShare: options.repairMaxShare,
  };
}
