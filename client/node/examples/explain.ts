/**
 * Streams one explanation and prints a line per property result and the timings
 * (`node dist/examples/explain.js --help` prints the options and examples).
 *
 * Exit codes as the Python CLI's: 0 success, 2 an error the user can fix (bad option,
 * unreadable image, refused or failed call), 3 a property failed on the server or got no
 * result (reported on its line; the others are still printed).
 */

import { parseArgs } from "node:util";

import {
  PROPERTY_SYNTAX,
  READABLE_FORMATS,
  REGION_SYNTAX,
  buildExplainRequest,
  createClient,
  type Accepted,
  type Done,
  type OutputKind,
  type PropertyResult,
} from "../src";

const DEFAULT_TARGET = "127.0.0.1:50051";
const EXIT_USAGE = 2;
const EXIT_PROPERTY_FAILED = 3;
const USAGE = "usage: explain.js IMAGE --model NAME --property SPEC [--property SPEC ...] [options]";
const HELP = `${USAGE}

Explains IMAGE's prediction by the classifier --model for each --property, printing a line per
property as it finishes (score, p-value, significant, relevant, N, flipped, target), then the
timings.

IMAGE is ${READABLE_FORMATS}; formats other than PNG and JPEG are converted to PNG, as the
Python CLI does.

--property SPEC: ${PROPERTY_SYNTAX}
  REGION limits an editor's edit: ${REGION_SYNTAX}.
  -p 'hue=procedural:operation=hue,amount=90'
  -p 'hue=procedural:operation=hue;mask=cat-mask.webp'
  -p 'patch=procedural:operation=blend;box_px=10,10,74,74'
  -p 'rain=@paths/rain/'

options:
  -m, --model NAME          the classifier (a Triton model name; required)
  -p, --property SPEC       a property to intervene on; repeatable (required)
  --target HOST:PORT        the gateway (default: $PROPSCOPE_TARGET or ${DEFAULT_TARGET});
                            several: IP:PORT,IP:PORT or dns:///NAME:PORT (round robin)
  --steps N                 edited images per path (default: 10)
  --seed N                  seed for editing and the test (default: 0)
  --token TOKEN             bearer token (default: $PROPSCOPE_TOKEN)
  --fixed-steps             decide on exactly --steps (no adaptive lengthening)
  --max-steps N             adaptive paths: the longest path (default: the server's limit)
  --mean R,G,B              preprocessing mean, overriding the model's declaration
  --std R,G,B               preprocessing std (positive)
  --output-kind KIND        logits or probabilities
  --labels A,B,...          class names by index
  -h, --help                print this help and exit

examples:
  # in client/node; \`propscope models\` lists the editors and their parameters
  node dist/examples/explain.js ../../docs/sample.png -m synth_hue \\
    -p 'object_hue=procedural:operation=hue,region=object' -p 'patch=procedural:operation=blend'
  node dist/examples/explain.js cat.webp -m resnet50 -p 'hue=procedural:operation=hue' \\
    --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --labels cat,dog

exit codes:
  0  every property explained
  2  a bad option, an unreadable image, or a refused or failed call
  3  a property failed on the server or got no result (its line says why; the others are
     still printed)`;

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      help: { type: "boolean", short: "h", default: false },
      model: { type: "string", short: "m" },
      property: { type: "string", short: "p", multiple: true },
      target: { type: "string", default: process.env.PROPSCOPE_TARGET || DEFAULT_TARGET },
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
  if (values.help) {
    console.log(HELP);
    return;
  }
  const [imagePath] = positionals;
  if (positionals.length !== 1 || !values.model || !values.property?.length) {
    throw new Error(`${USAGE} (--help for more)`);
  }
  const steps = Number(values.steps);
  if (!Number.isInteger(steps)) {
    throw new Error(`--steps must be an integer, got '${values.steps}'`);
  }

  const triple = (text: string | undefined) => text?.split(",").map(Number);
  const request = await buildExplainRequest({
    image: imagePath,
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
  const explained = new Set<string>();
  let accepted: Accepted | undefined;
  try {
    for await (const event of client.explain(request)) {
      if (event.event === "accepted") {
        accepted = event.accepted;
        for (const warning of accepted.warnings) console.log(`warning: ${warning}`);
      }
      if (event.event === "propertyResult") {
        const result = event.propertyResult;
        console.log(resultLine(result, accepted));
        if ((result.status?.code ?? 0) === 0) explained.add(result.propertyName);
      }
      if (event.event === "done") console.log(doneLine(event.done));
    }
  } finally {
    client.close();
  }
  // A property that failed or got no result: exit code 3, as the Python CLI's.
  if (accepted?.propertyNames.some((name) => !explained.has(name))) {
    process.exitCode = EXIT_PROPERTY_FAILED;
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
    `score ${ms(done.scoreMs)}, cache ${ms(done.cacheMs)} ` +
    `(stage times summed over properties run in parallel), ${done.propertiesFailed} failed`
  );
}

main().catch((error: Error) => {
  console.error(`explain: error: ${error.message}`);
  process.exitCode = EXIT_USAGE;
});
