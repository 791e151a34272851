/**
 * The Python CLI's text syntax for a property, `NAME=EDITOR[@VERSION][:key=value,key=value...]`,
 * so that the same `--property` strings work in both clients.
 */

import type { Property } from "./generated/propscope/v1/Property";

export const PROPERTY_SYNTAX = "NAME=EDITOR[@VERSION][:key=value,key=value...]";

// A comma only separates parameters when the next item looks like `key=`, so values such as
// prompts may contain commas ("prompt=a red car, at night,steps=4" has two parameters).
const PARAMETER_SEPARATOR = /,(?=\s*[A-Za-z_][\w.\-]*\s*=)/;

/**
 * Parses e.g. `object_hue=procedural:operation=hue,region=object` into a `propscope.v1.Property`
 * whose editor is the Triton model `procedural`. Names, editors and keys are trimmed; values are
 * kept as written. Throws an Error naming the problem when the text is malformed.
 */
export function parseProperty(text: string): Property {
  const invalid = (why: string) => new Error(`invalid property '${text}': ${why}`);
  const [namePart, rest] = splitOnce(text, "=");
  const name = namePart.trim();
  if (rest === undefined) throw invalid(`missing '=' (expected ${PROPERTY_SYNTAX})`);
  if (!name) throw invalid(`empty name (expected ${PROPERTY_SYNTAX})`);
  const [editorPart, parametersPart] = splitOnce(rest, ":");
  const [editorName, versionPart] = splitOnce(editorPart.trim(), "@");
  const editor = editorName.trim();
  const version = (versionPart ?? "").trim();
  if (!editor) throw invalid(`empty editor (expected ${PROPERTY_SYNTAX})`);
  if (versionPart !== undefined && !version) throw invalid("empty editor version after '@'");
  const parameters = parametersPart === undefined ? {} : parseParameters(parametersPart, invalid);
  return { name, editor: { model: editor, version, parameters } };
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

/** Python's `str.partition`: the text before the first `separator` and the rest, if any. */
function splitOnce(text: string, separator: string): [string, string | undefined] {
  const at = text.indexOf(separator);
  return at < 0 ? [text, undefined] : [text.slice(0, at), text.slice(at + separator.length)];
}
