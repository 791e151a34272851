// The class explorer's page: picks a model and a class, starts the explorer's jobs (server.py)
// and draws their results. Each panel has a data-state (idle, loading, done, failed); a failed
// call shows the gateway's status code and message in the panel, never a blank one.
"use strict";

const POLL_MS = 300;
const state = { models: [], settings: null, imageId: null, generation: 0, bank: null };

const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

class CallFailed extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new CallFailed("UNAVAILABLE", `the explorer does not answer: ${error.message}`);
  }
  const document_ = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (document_ && document_.error) || {};
    throw new CallFailed(error.code || `HTTP ${response.status}`, error.message || response.statusText);
  }
  return document_;
}

// A job: started (or found in the explorer's cache), then polled until done; progress goes to
// `onProgress`. Resolves to the result, rejects with the job's error.
async function runJob(spec, onProgress) {
  let job = await api("/api/jobs", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(spec),
  });
  while (job.state === "running") {
    onProgress(job);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    job = await api(`/api/jobs/${job.id}`);
  }
  if (job.state === "failed") throw new CallFailed(job.error.code, job.error.message);
  return job.result;
}

// Panels.

function panelParts(panel) {
  return { status: panel.querySelector(".panel-status"), body: panel.querySelector(".panel-body") };
}

function showProgress(statusNode, job) {
  const bar = element("progress", job.total ? { max: job.total, value: job.done } : {});
  const text = job.total ? `${job.stage}: ${job.done} of ${job.total}` : job.stage || "starting";
  statusNode.replaceChildren(element("div", { class: "progress" }, [bar, element("span", { text })]));
}

function showError(statusNode, error) {
  statusNode.replaceChildren(
    element("div", { class: "error", role: "alert" }, [
      element("span", { class: "code", text: error.code || "ERROR" }),
      element("span", { class: "message", text: error.message }),
    ]),
  );
}

// Runs `spec` for `panel` and draws its result with `draw(result, body)`; a newer selection
// (generation) makes the answer stale, and it is dropped.
async function fillPanel(panel, spec, draw) {
  const generation = state.generation;
  const { status, body } = panelParts(panel);
  panel.dataset.state = "loading";
  body.replaceChildren();
  showProgress(status, { stage: "starting" });
  try {
    const result = await runJob(spec, (job) => {
      if (generation === state.generation) showProgress(status, job);
    });
    if (generation !== state.generation) return null;
    status.replaceChildren();
    draw(result, body);
    panel.dataset.state = "done";
    return result;
  } catch (error) {
    if (generation !== state.generation) return null;
    showError(status, error);
    panel.dataset.state = "failed";
    return null;
  }
}

function figures(pairs) {
  const list = element("dl", { class: "figures" });
  for (const [label, value, shown, key] of pairs) {
    list.append(element("dt", { text: label }));
    list.append(element("dd", { "data-key": key, "data-value": value === null ? "" : String(value), text: shown }));
  }
  return list;
}

function number(value, digits = 4) {
  if (value === null || value === undefined) return "n/a";
  if (Math.abs(value) >= 1e-3 || value === 0) return Number(value.toPrecision(digits)).toString();
  return value.toExponential(digits - 1);
}

function warnings(list) {
  return list.map((text) => element("div", { class: "warning", text: `⚠ ${text}` }));
}

function picture(uri, className, alt) {
  return element("img", { class: className, src: uri, alt });
}

// The selection.

function selection() {
  return { model: $("model").value, version: $("version").value, class: Number($("class").value) };
}

function currentModel() {
  return state.models.find((model) => model.name === $("model").value);
}

function fillSelect(select, options) {
  select.replaceChildren(...options.map(([value, text]) => element("option", { value, text })));
}

function onModel() {
  const model = currentModel();
  fillSelect($("version"), model.versions.map((version) => [version, version]));
  fillSelect($("class"), model.classes.map((c) => [c.index, `${c.index}: ${c.label}`]));
  onClass();
}

function onClass() {
  state.generation += 1;
  state.bank = null;
  const model = currentModel();
  const chosen = model.classes[Number($("class").value)];
  $("class-name").textContent = `${chosen.label} (class ${chosen.index} of ${model.name})`;
  const concepts = loadConcepts();
  fillPanel($("class-picture"), { ...selection(), kind: "class_picture" }, drawClassPicture);
  if (state.imageId) loadImagePanels(concepts);
}

// The class: its concepts, then their pictures.

async function loadConcepts() {
  const bank = await fillPanel($("concepts"), { ...selection(), kind: "concepts" }, drawConcepts);
  state.bank = bank;
  if (bank) {
    const shown = bank.concepts.slice(0, state.settings.pictures);
    for (const concept of shown) {
      const card = document.querySelector(`.concept[data-concept="${concept.index}"] .concept-picture`);
      fillPanel(card, { ...selection(), kind: `concept_picture:${concept.index}` }, drawConceptPicture);
    }
  }
  return bank;
}

function drawClassPicture(result, body) {
  body.append(
    picture(result.uri, "picture", "MACO picture of the class"),
    figures([
      ["objective", result.objective, number(result.objective), "objective"],
      ["p(class)", result.class_probability, number(result.class_probability), "class_probability"],
    ]),
    ...warnings(result.warnings),
  );
}

function drawConceptPicture(result, body) {
  body.append(picture(result.uri, "picture", `MACO picture of concept ${result.concept}`));
}

function drawConcepts(bank, body) {
  body.append(
    element("div", { class: "muted", "data-bank-id": bank.bank_id, text: `bank ${bank.bank_id}` }),
    figures([
      ["layer", bank.layer, bank.layer, "layer"],
      ["concepts", bank.rank, String(bank.rank), "rank"],
      ["images, crops", bank.images, `${bank.images} images, ${bank.crops} crops`, "images"],
      ["reconstruction error", bank.reconstruction_error, number(bank.reconstruction_error), "reconstruction_error"],
      ["logit shares", bank.logit_share_exact, bank.logit_share_exact ? "exact" : "approximate", "logit_share_exact"],
    ]),
    ...warnings(bank.warnings),
  );
  const list = element("div", { class: "concepts" });
  bank.concepts.forEach((concept, rank) => {
    // A placeholder until its picture comes; past the top `pictures`, a note instead.
    const drawn = rank < state.settings.pictures;
    const pictureSlot = element("div", { class: "concept-picture", "data-state": "idle" }, [
      element("div", { class: "panel-status", text: drawn ? "" : `pictures are drawn for the top ${state.settings.pictures}` }),
      element("div", { class: "panel-body" }, drawn ? [element("div", { class: "placeholder", style: "width:160px;height:160px" })] : []),
    ]);
    const crops = element("div", { class: "crops" }, concept.crops.map((crop) =>
      element("img", { class: "crop", src: crop.uri, alt: `crop of image ${crop.image}`, title: `image ${crop.image}, coefficient ${number(crop.coefficient)}` })));
    list.append(
      element("div", { class: "concept", "data-concept": concept.index }, [
        element("div", { class: "rank", text: `#${rank + 1}` }),
        pictureSlot,
        element("div", {}, [
          element("h3", { text: `concept ${concept.index}` }),
          figures([
            ["Sobol importance", concept.importance, number(concept.importance), "importance"],
            ["logit share", concept.logit_share, number(concept.logit_share), "logit_share"],
          ]),
          crops,
        ]),
      ]),
    );
  });
  body.append(list);
}

// The uploaded image.

async function onUpload() {
  const file = $("upload").files[0];
  if (!file) return;
  const status = panelParts($("propgrad")).status;
  try {
    const uploaded = await api("/api/images", { method: "POST", body: file });
    state.imageId = uploaded.image_id;
    $("uploaded").src = URL.createObjectURL(file);
    $("uploaded").hidden = false;
  } catch (error) {
    $("propgrad").dataset.state = "failed";
    showError(status, error);
    return;
  }
  loadImagePanels(waitForBank());
}

// The class's bank once its panel has settled (it may still be fitting when an image comes).
async function waitForBank() {
  const generation = state.generation;
  while ($("concepts").dataset.state === "loading" && generation === state.generation) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
  return state.bank;
}

async function loadImagePanels(bankPromise) {
  const image = { ...selection(), image_id: state.imageId };
  fillPanel($("propgrad"), { ...image, kind: "propgrad" }, drawPropgrad);
  fillPanel($("sobol"), { ...image, kind: "sobol" }, drawSobol);
  const mapPanel = $("concept-map");
  mapPanel.dataset.state = "loading";
  showProgress(panelParts(mapPanel).status, { stage: "waiting for the class's concepts" });
  const generation = state.generation;
  const bank = await bankPromise;
  if (generation !== state.generation) return;
  if (!bank) {
    mapPanel.dataset.state = "failed";
    showError(panelParts(mapPanel).status, {
      code: "FAILED_PRECONDITION",
      message: "the class's concepts could not be fitted (see the concepts panel)",
    });
    return;
  }
  fillPanel(mapPanel, { ...image, kind: "concept_map" }, drawConceptMap);
}

function curve(values) {
  const width = 240, height = 110, pad = 18;
  const x = (i) => pad + (i / Math.max(values.length - 1, 1)) * (width - 2 * pad);
  const y = (v) => height - pad - v * (height - 2 * pad);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "curve");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", values.map((v, i) => `${x(i).toFixed(1)},${y(v ?? 0).toFixed(1)}`).join(" "));
  line.setAttribute("data-values", JSON.stringify(values));
  const labels = [["1", 2, y(1) + 4], ["0", 2, y(0) + 4], ["strength →", width - 70, height - 4]];
  for (const [text, tx, ty] of labels) {
    const node = document.createElementNS(svg.namespaceURI, "text");
    node.setAttribute("x", tx);
    node.setAttribute("y", ty);
    node.textContent = text;
    svg.append(node);
  }
  svg.append(line);
  return svg;
}

function drawPropgrad(result, body) {
  for (const found of result.properties) {
    const row = element("div", { class: "property", "data-property": found.name });
    const side = element("div", {}, [element("h3", { text: found.name })]);
    if (!found.ok) {
      const status = element("div");
      showError(status, { code: "FAILED", message: found.error });
      row.append(side, status);
      body.append(row);
      continue;
    }
    side.append(
      figures([
        ["E|∇X| score", found.score, number(found.score), "score"],
        ["p-value", found.p_value, number(found.p_value), "p_value"],
        ["Δp", found.probability_change, number(found.probability_change), "probability_change"],
        ["decision", found.decision, found.decision.replaceAll("_", " "), "decision"],
        ["class", found.target_class, `${found.target_class} ${found.target_label}`, "target_class"],
      ]),
      ...warnings(found.warnings),
    );
    const paths = element("div");
    found.curves.forEach((values, sample) => {
      paths.append(curve(values));
      paths.append(element("div", { class: "strip" }, found.strips[sample].map((uri, step) =>
        picture(uri, "step", `${found.name}, step ${step}`))));
    });
    row.append(side, paths);
    body.append(row);
  }
}

function drawSobol(result, body) {
  body.append(
    picture(result.overlay, "overlay", "Sobol map over the image"),
    figures([
      ["class", result.target_class, `${result.target_class} ${result.target_label}`, "target_class"],
      [result.target_score, result.original_score, number(result.original_score), "original_score"],
      ["design", result.options, result.options, "options"],
      ["forward passes", result.forward_passes, String(result.forward_passes), "forward_passes"],
    ]),
    ...warnings(result.warnings),
  );
}

function drawConceptMap(result, body) {
  const maps = element("div", { class: "maps" });
  result.maps.forEach((map, rank) => {
    maps.append(element("figure", { "data-concept": map.concept }, [
      picture(map.overlay, "small-overlay", `map of concept ${map.concept}`),
      element("figcaption", { text: `#${rank + 1} concept ${map.concept} (${number(map.importance, 3)})` }),
    ]));
  });
  body.append(maps);
}

async function start() {
  const status = $("pick-status");
  try {
    state.settings = await api("/api/settings");
    $("gateway").textContent = state.settings.gateway;
    state.models = await api("/api/models");
  } catch (error) {
    status.dataset.state = "failed";
    showError(status, error);
    return;
  }
  if (!state.models.length) {
    status.dataset.state = "failed";
    showError(status, { code: "NOT_FOUND", message: "the gateway serves no ready classifier" });
    return;
  }
  fillSelect($("model"), state.models.map((model) => [model.name, model.name]));
  $("model").addEventListener("change", onModel);
  $("version").addEventListener("change", onClass);
  $("class").addEventListener("change", onClass);
  $("upload").addEventListener("change", onUpload);
  status.dataset.state = "done";
  onModel();
}

start();
