/**
 * Streams one explanation and prints a line per property result and the timings.
 *
 *   node dist/examples/explain.js IMAGE --model NAME --property NAME=EDITOR:key=value,... \
 *     [--property ...] [--target host:port] [--steps N] [--seed N] [--token TOKEN] \
 *     [--fixed-steps] [--max-steps N] [--mean R,G,B] [--std R,G,B] \
 *     [--output-kind logits|probabilities] [--labels A,B,...]
 *
 * Exit codes as the Python CLI's: 0 success, 2 an error the user can fix (bad option,
 * unreadable image, refused or failed call). A property that fails on the server is reported
 * on its line and is not an error of the command.
 */

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import {
  buildExplainRequest,
  createClient,
  type Accepted,
  type Done,
  type OutputKind,
  type PropertyResult,
} from "../src";

const USAGE =
  "usage: explain.js IMAGE --model NAME --property NAME=EDITOR:key=value,... [--property ...] " +
  "[--target host:port] [--steps N] [--seed N] [--token TOKEN] [--fixed-steps] " +
  "[--max-steps N] [--mean R,G,B] [--std R,G,B] [--output-kind logits|probabilities] " +
  "[--labels A,B,...]";

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      model: { type: "string" },
      property: { type: "string", multiple: true },
      target: { type: "string", default: "127.0.0.1:50051" },
      steps: { type: "string", default: "10" },
      seed: { type: "string", default: "0" },
      token: { type: "string", default: process.env.PROPSCOPE_TOKEN },
      "fixed-steps": { type: "boolean", default: false },
      "max-steps": { type: "string", default: "0" },
      mean: { type: "string" },
      std: { type: "string" },
      "output-kind": { type: "string" },
      labels: { type: "string" },
    },
  });
  const [imagePath] = positionals;
  if (positionals.length !== 1 || !values.model || !values.property?.length) {
    throw new Error(USAGE);
  }
  const steps = Number(values.steps);
  if (!Number.isInteger(steps)) {
    throw new Error(`--steps must be an integer, got '${values.steps}'`);
  }

  const triple = (text: string | undefined) => text?.split(",").map(Number);
  const request = buildExplainRequest({
    image: readFileSync(imagePath),
    model: values.model,
    properties: values.property,
    steps,
    seed: values.seed,
    pathMode: values["fixed-steps"] ? "fixed" : undefined,
    maxSteps: Number(values["max-steps"]),
    preprocessing: {
      mean: triple(values.mean),
      std: triple(values.std),
      outputKind: values["output-kind"] as OutputKind | undefined,
    },
    classLabels: values.labels?.split(",").map((label) => label.trim()),
  });

  const client = createClient(values.target, { token: values.token });
  try {
    let accepted: Accepted | undefined;
    for await (const event of client.explain(request)) {
      if (event.event === "accepted") {
        accepted = event.accepted;
        for (const warning of accepted.warnings) console.log(`warning: ${warning}`);
      }
      if (event.event === "propertyResult") {
        console.log(resultLine(event.propertyResult, accepted));
      }
      if (event.event === "done") console.log(doneLine(event.done));
    }
  } finally {
    client.close();
  }
}

function resultLine(result: PropertyResult, accepted?: Accepted): string {
  const status = result.status ?? { code: 0, message: "" };
  if (status.code !== 0) {
    return `${result.propertyName}: failed (code ${status.code}): ${status.message}`;
  }
  const yesNo = (flag: boolean) => (flag ? "yes" : "no");
  const label = result.targetLabel || accepted?.classLabels[result.targetClass];
  const decision = result.decision.replace("DECISION_", "").toLowerCase();
  const lines = [
    `${result.propertyName}: score ${result.score.toPrecision(4)}, ` +
      `p-value ${result.pValue.toPrecision(3)}, significant ${yesNo(result.significant)}, ` +
      `relevant ${yesNo(result.relevant)}${result.relevant ? "" : ` (${decision})`}, ` +
      `N ${result.steps}, ` +
      `flipped ${yesNo(result.predictionFlipped)}, ` +
      `target ${result.targetClass}${label ? ` (${label})` : ""}`,
  ];
  if (result.decisionDetail) lines.push(`  ${result.decisionDetail}`);
  for (const warning of result.warnings) lines.push(`  warning: ${warning}`);
  return lines.join("\n");
}

function doneLine(done: Done): string {
  const ms = (value: number) => `${Math.round(value)} ms`;
  return (
    `done: total ${ms(done.totalMs)}, edit ${ms(done.editMs)}, classify ${ms(done.classifyMs)}, ` +
    `score ${ms(done.scoreMs)}, cache ${ms(done.cacheMs)}, ${done.propertiesFailed} failed`
  );
}

main().catch((error: Error) => {
  console.error(`explain: error: ${error.message}`);
  process.exitCode = 2;
});
