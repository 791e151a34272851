/** The property syntax, case for case as the Python SDK's tests/unit/test_client_properties.py. */

import assert from "node:assert/strict";
import { test } from "node:test";

import { parseProperty } from "../src";

const editor = (model: string, parameters: Record<string, string> = {}, version = "") => ({
  model,
  version,
  parameters,
});

test("valid specs parse as the Python CLI parses them", () => {
  const cases: [string, string, ReturnType<typeof editor>][] = [
    [
      "object_hue=procedural:operation=hue,region=object,degrees=180",
      "object_hue",
      editor("procedural", { operation: "hue", region: "object", degrees: "180" }),
    ],
    ["blur=gaussian", "blur", editor("gaussian")],
    [" blur = gaussian @ 2 ", "blur", editor("gaussian", {}, "2")],
    ["b=ed@1:sigma=2", "b", editor("ed", { sigma: "2" }, "1")],
    ["b=ed: sigma = 2 , k=v", "b", editor("ed", { sigma: " 2 ", k: "v" })],
    // Values keep '=', ':' and commas that are not followed by key=.
    ["u=ed:url=http://x/y?a=b", "u", editor("ed", { url: "http://x/y?a=b" })],
    [
      "p=diffusion:prompt=a red car, at night,steps=4",
      "p",
      editor("diffusion", { prompt: "a red car, at night", steps: "4" }),
    ],
    ["c=ed:constructor=1", "c", editor("ed", { constructor: "1" })],
  ];
  for (const [text, name, expected] of cases) {
    assert.deepEqual(parseProperty(text), { name, editor: expected }, text);
  }
});

test("malformed specs are refused with a message naming the problem", () => {
  const cases: [string, string][] = [
    ["object_hue", "missing '='"],
    ["", "missing '='"],
    ["=procedural", "empty name"],
    ["hue=", "empty editor"],
    ["hue=:a=b", "empty editor"],
    ["hue=ed@", "empty editor version"],
    ["hue=ed:", "no parameters"],
    ["hue=ed:operation", "'operation' is not key=value"],
    ["hue=ed:=hue", "is not key=value"],
    ["hue=ed:a=1,a=2", "'a' given twice"],
    ["hue=ed:a=1,", "empty parameter"],
    ["hue=ed:a=1,,b=2", "empty parameter"],
  ];
  for (const [text, words] of cases) {
    assert.throws(() => parseProperty(text), (error: Error) => {
      assert.match(error.message, /^invalid property/);
      assert.ok(error.message.includes(words), `${text}: ${error.message}`);
      return true;
    });
  }
});
