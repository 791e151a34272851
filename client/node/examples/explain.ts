/**
 * Streams one explanation and prints a line per property result and the timings.
 *
 *   node dist/examples/explain.js IMAGE --model NAME --property NAME=EDITOR:key=value,... \
 *     [--property ...] [--target host:port] [--steps N] [--seed N] [--token TOKEN]
 *
 * Exit codes as the Python CLI's: 0 success, 2 an error the user can fix (bad option,
 * unreadable image, refused or failed call). A property that fails on the server is reported
 * on its line and is not an error of the command.
 */

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { createClient, parseProperty, type Done, type PropertyResult } from "../src";

const USAGE =
  "usage: explain.js IMAGE --model NAME --property NAME=EDITOR:key=value,... [--property ...] " +
  "[--target host:port] [--steps N] [--seed N] [--token TOKEN]";

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

  const client = createClient(values.target, { token: values.token });
  try {
    const events = client.explain({
      image: readFileSync(imagePath),
      model: { name: values.model, predictedClass: true },
      properties: values.property.map(parseProperty),
      steps,
      seed: values.seed,
    });
    for await (const event of events) {
      if (event.event === "propertyResult") console.log(resultLine(event.propertyResult));
      if (event.event === "done") console.log(doneLine(event.done));
    }
  } finally {
    client.close();
  }
}

function resultLine(result: PropertyResult): string {
  const status = result.status ?? { code: 0, message: "" };
  if (status.code !== 0) {
    return `${result.propertyName}: failed (code ${status.code}): ${status.message}`;
  }
  const yesNo = (flag: boolean) => (flag ? "yes" : "no");
  return (
    `${result.propertyName}: score ${result.score.toPrecision(4)}, ` +
    `p-value ${result.pValue.toPrecision(3)}, significant ${yesNo(result.significant)}, ` +
    `relevant ${yesNo(result.relevant)}, flipped ${yesNo(result.predictionFlipped)}`
  );
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
