// The page: upload an image, click to segment, refine, segment everything, download.
//
// State is a list of objects, each replaced (never mutated) when it changes, so undo and
// redo are snapshots of that list. An object's prompts are its clicks and box; every change
// sends them, with the mask_id of the candidate chosen from the last answer, so the server
// refines from that mask as SamPredictor does with mask_input.

import { ProblemError, embedImage, segmentEverything, segmentPrompts } from "./api.js";
import { cocoDocument, download, masksZip } from "./export.js";
import { colourOf, compose, cssColour, decodeRle, paintMask } from "./masks.js";

const MAX_DISPLAY_SIDE = 2048; // larger images are shown scaled down (masks stay full size)
const DRAG_THRESHOLD_PX = 5; // a press that moves further draws a box
const HISTORY_LIMIT = 200;
const TIMING_LABELS = {
  decode_image: "decode",
  preprocess: "resize",
  encoder: "encoder",
  decoder: "decoder",
  postprocess: "post-processing",
  overlay: "overlay",
  total: "total",
};

const $ = (id) => document.getElementById(id);
const view = $("view");
const marks = $("marks");

const state = {
  image: null, // {file, name, width, height, display, scale, base, ready, usable}
  objects: [], // [{key, colour, points, box, candidates, selected, version, answered, source}]
  current: null, // key of the object clicks refine; null: the next click starts one
  undo: [],
  redo: [],
  everything: null, // AbortController of a running segment-everything
};
let nextKey = 1;
let nextColour = 0;
let nextVersion = 1;
let loadToken = 0;
let drag = null;
const inFlight = new Set();
const stale = new Set();

// --- messages --------------------------------------------------------------------------------

function showError(error) {
  const problem =
    error instanceof ProblemError
      ? error.problem
      : { title: "Something went wrong", detail: String(error.message || error), code: "" };
  $("error-title").textContent = problem.title || "Error";
  $("error-detail").textContent = problem.detail || "";
  $("error-code").textContent = problem.code || "";
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function notify(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function showTimings(body) {
  const parts = Object.entries(body.timings_ms || {})
    .filter(([name]) => name in TIMING_LABELS)
    .map(([name, ms]) => `${TIMING_LABELS[name]} ${Math.round(ms)} ms`);
  if (body.cache_hit !== undefined) parts.push(body.cache_hit ? "cache hit" : "cache miss");
  $("timings").textContent = parts.join(" · ");
}

// --- the image -------------------------------------------------------------------------------

async function loadFile(file) {
  if (!file) return;
  const token = ++loadToken;
  hideError();
  notify("");
  cancelEverything();
  const embedding = embedImage(file);
  embedding.catch(() => {}); // handled below; never an unhandled rejection
  const bitmap = await createImageBitmap(file).catch(() => null);
  if (token !== loadToken) return;
  if (bitmap) showImage(file, bitmap.width, bitmap.height, bitmap, embedding);
  let info;
  try {
    info = await embedding;
  } catch (error) {
    if (token !== loadToken) return;
    showError(error);
    if (bitmap) state.image.failed = true;
    updateControls();
    return;
  }
  if (token !== loadToken) return;
  if (!bitmap) {
    showImage(file, info.width, info.height, null, embedding);
    notify("This browser cannot display the image; its masks are drawn on a grey background.");
  } else if (info.width !== bitmap.width || info.height !== bitmap.height) {
    showImage(file, info.width, info.height, bitmap, embedding); // e.g. EXIF rotation
  }
  state.image.imageId = info.image_id;
  state.image.usable = true;
  showTimings(info);
  updateControls();
  for (const object of state.objects) if (needsAnswer(object)) refine(object.key);
}

function showImage(file, width, height, bitmap, embedding) {
  const scale = Math.min(1, MAX_DISPLAY_SIDE / Math.max(width, height));
  const display = {
    width: Math.max(1, Math.round(width * scale)),
    height: Math.max(1, Math.round(height * scale)),
  };
  view.width = display.width;
  view.height = display.height;
  const context = view.getContext("2d", { willReadFrequently: true });
  if (bitmap) {
    context.drawImage(bitmap, 0, 0, display.width, display.height);
  } else {
    context.fillStyle = "#9ca3af";
    context.fillRect(0, 0, display.width, display.height);
  }
  const base = context.getImageData(0, 0, display.width, display.height).data;
  state.image = {
    file,
    name: file.name || "image",
    width,
    height,
    display,
    scale: display.width / width,
    base,
    labels: new Uint16Array(display.width * display.height),
    ready: embedding.then((info) => info.image_id),
    usable: false, // the server has its embedding
    failed: false, // the server refused it
  };
  state.image.ready.catch(() => {}); // loadFile reports a refusal; requests see it too
  state.objects = [];
  state.current = null;
  state.undo = [];
  state.redo = [];
  nextColour = 0;
  $("dropzone").hidden = true;
  $("canvas-wrap").hidden = false;
  fitView();
  render();
}

// Shows the image as large as the stage allows (small images scaled up, to aim at), and
// sizes the prompt layer to the screen's pixels so that its marks stay sharp.
function fitView() {
  const image = state.image;
  if (!image) return;
  const available = $("stage").clientWidth;
  const maxHeight = Math.max(200, window.innerHeight - 170);
  const scale = Math.min(available / image.width, maxHeight / image.height);
  const width = Math.max(1, Math.floor(image.width * scale));
  const height = Math.max(1, Math.floor(image.height * scale));
  view.style.width = `${width}px`;
  view.style.height = `${height}px`;
  marks.width = Math.round(width * window.devicePixelRatio);
  marks.height = Math.round(height * window.devicePixelRatio);
  drawMarks();
}

// A request on the image; if the server no longer has its embedding, the file goes again.
async function withImage(call) {
  const image = state.image;
  try {
    return await call(await image.ready);
  } catch (error) {
    if (!(error instanceof ProblemError) || error.code !== "unknown_image_id") throw error;
    const again = embedImage(image.file);
    image.ready = again.then((info) => info.image_id);
    return call(await image.ready);
  }
}

// --- objects and history ---------------------------------------------------------------------

function snapshot() {
  return { objects: state.objects, current: state.current };
}

function remember() {
  state.undo.push(snapshot());
  if (state.undo.length > HISTORY_LIMIT) state.undo.shift();
  state.redo = [];
}

function restore(from, to) {
  const entry = from.pop();
  if (!entry) return;
  to.push(snapshot());
  state.objects = entry.objects;
  state.current = entry.current;
  render();
  for (const object of state.objects) if (needsAnswer(object)) refine(object.key);
}

const undo = () => restore(state.undo, state.redo);
const redo = () => restore(state.redo, state.undo);

function currentObject() {
  return state.objects.find((object) => object.key === state.current) || null;
}

function put(object) {
  const index = state.objects.findIndex((other) => other.key === object.key);
  state.objects =
    index < 0
      ? [...state.objects, object]
      : state.objects.map((other, i) => (i === index ? object : other));
  state.current = object.key;
}

function newObject() {
  return {
    key: nextKey++,
    colour: nextColour++,
    points: [],
    box: null,
    candidates: [],
    selected: 0,
    version: 0,
    answered: 0,
    source: "prompt",
  };
}

function needsAnswer(object) {
  return object.source === "prompt" && object.version !== object.answered && hasPrompt(object);
}

function hasPrompt(object) {
  return object.points.length > 0 || object.box !== null;
}

function addPoint(x, y, label) {
  remember();
  const object = currentObject() || newObject();
  const points = [...object.points, { x, y, label }];
  put({ ...object, points, source: "prompt", version: nextVersion++ });
  render();
  refine(state.current);
}

function setBox(box) {
  remember();
  const object = currentObject() || newObject();
  put({ ...object, box, source: "prompt", version: nextVersion++ });
  render();
  refine(state.current);
}

function startNewObject() {
  if (state.current === null) return;
  remember();
  state.current = null;
  render();
}

function select(key) {
  if (key === state.current) return;
  remember();
  state.current = key;
  render();
}

function chooseCandidate(index) {
  const object = currentObject();
  if (!object || index >= object.candidates.length || index === object.selected) return;
  remember();
  put({ ...object, selected: index });
  render();
}

function deleteObject(key) {
  if (!state.objects.some((object) => object.key === key)) return;
  remember();
  state.objects = state.objects.filter((object) => object.key !== key);
  if (state.current === key) state.current = null;
  render();
}

function clearObjects() {
  if (!state.objects.length) return;
  remember();
  state.objects = [];
  state.current = null;
  render();
}

function promptOf(object) {
  const prompt = {};
  if (object.points.length) {
    prompt.points = object.points.map((point) => [point.x, point.y]);
    prompt.labels = object.points.map((point) => point.label);
  }
  if (object.box) prompt.box = object.box;
  const chosen = object.candidates[object.selected];
  if (chosen && chosen.record.mask_id) prompt.mask_id = chosen.record.mask_id;
  return prompt;
}

// Sends the object's prompts; one request per object at a time, the latest prompts next.
async function refine(key) {
  if (!state.image) return;
  if (inFlight.has(key)) {
    stale.add(key);
    return;
  }
  inFlight.add(key);
  updateBusy();
  const image = state.image;
  try {
    for (;;) {
      stale.delete(key);
      const object = state.objects.find((candidate) => candidate.key === key);
      if (!object || !needsAnswer(object)) break;
      const prompt = promptOf(object);
      const multimask = !prompt.mask_id || $("always-three").checked;
      const body = await requestMasks(prompt, multimask);
      if (image !== state.image) return;
      hideError();
      showTimings(body);
      const latest = state.objects.find((candidate) => candidate.key === key);
      if (latest && latest.version === object.version) {
        const candidates = body.results[0].masks.map((record) => ({
          record,
          mask: decodeRle(record.segmentation),
        }));
        replaceQuietly({ ...latest, candidates, selected: 0, answered: object.version });
        render();
      }
      if (!stale.has(key)) break;
    }
  } catch (error) {
    if (image === state.image) showError(error);
  } finally {
    inFlight.delete(key);
    stale.delete(key);
    updateBusy();
  }
}

async function requestMasks(prompt, multimask) {
  try {
    return await withImage((imageId) => segmentPrompts(imageId, [prompt], multimask));
  } catch (error) {
    if (!(error instanceof ProblemError) || error.code !== "unknown_mask_id") throw error;
    notify("The previous mask had expired on the server; this answer uses the clicks alone.");
    const { mask_id: _expired, ...rest } = prompt;
    return withImage((imageId) => segmentPrompts(imageId, [rest], true));
  }
}

// An answer arriving is not an action of the user's: it changes no history, and every
// snapshot holding the same object (by version) takes the answer too, so undo keeps it.
function replaceQuietly(object) {
  const swap = (objects) =>
    objects.map((other) =>
      other.key === object.key && other.version === object.answered ? object : other,
    );
  state.objects = swap(state.objects);
  for (const entry of [...state.undo, ...state.redo]) entry.objects = swap(entry.objects);
}

// --- segment everything ----------------------------------------------------------------------

function everythingParams() {
  const params = {};
  for (const input of $("everything-form").querySelectorAll("input[name]")) {
    if (input.value !== "") params[input.name] = input.value;
  }
  return params;
}

async function runEverything() {
  if (!state.image || !state.image.usable || state.everything) return;
  const image = state.image;
  const controller = new AbortController();
  state.everything = controller;
  const progress = $("everything-progress");
  progress.removeAttribute("value"); // indeterminate until the first count
  progress.hidden = false;
  $("everything-cancel").hidden = false;
  $("everything-status").textContent = "Starting…";
  updateControls();
  const started = performance.now();
  try {
    const body = await withImage((imageId) =>
      segmentEverything(
        imageId,
        everythingParams(),
        ({ done, total }) => {
          progress.max = Math.max(total, 1);
          progress.value = done;
          $("everything-status").textContent = `${done} / ${total} points`;
        },
        controller.signal,
      ),
    );
    if (image !== state.image) return;
    hideError();
    remember();
    state.objects = body.masks.map((record) => ({
      ...newObject(),
      points: (record.point_coords || []).map(([x, y]) => ({ x, y, label: 1 })),
      candidates: [{ record, mask: decodeRle(record.segmentation) }],
      source: "everything",
    }));
    state.current = null;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const noun = body.count === 1 ? "object" : "objects";
    $("everything-status").textContent = `Found ${body.count} ${noun} in ${seconds} s.`;
    showTimings(body);
    render();
  } catch (error) {
    if (error.name === "AbortError") $("everything-status").textContent = "Cancelled.";
    else {
      $("everything-status").textContent = "";
      if (image === state.image) showError(error);
    }
  } finally {
    if (state.everything === controller) state.everything = null;
    progress.hidden = true;
    $("everything-cancel").hidden = true;
    updateControls();
  }
}

function cancelEverything() {
  if (state.everything) state.everything.abort();
}

// --- drawing ---------------------------------------------------------------------------------

// Each object's chosen mask, in the objects' order.
function shownMasks() {
  return state.objects.flatMap((object) => {
    const candidate = object.candidates[object.selected];
    return candidate ? [{ object, candidate }] : [];
  });
}

function render() {
  const image = state.image;
  if (image) {
    // Largest first, so that small objects stay visible on top of large ones.
    const shown = shownMasks().sort((a, b) => b.candidate.record.area - a.candidate.record.area);
    const palette = new Uint8Array((shown.length + 1) * 3);
    image.labels.fill(0);
    shown.forEach(({ object, candidate }, index) => {
      palette.set(colourOf(object.colour), (index + 1) * 3);
      paintMask(image.labels, image.display, candidate.mask, index + 1, image.scale);
    });
    const context = view.getContext("2d", { willReadFrequently: true });
    const output = context.createImageData(image.display.width, image.display.height);
    compose(image.base, image.labels, palette, image.display, output.data);
    context.putImageData(output, 0, 0);
  }
  drawMarks();
  renderPanels();
  updateControls();
}

function drawMarks() {
  const context = marks.getContext("2d");
  context.clearRect(0, 0, marks.width, marks.height);
  const image = state.image;
  if (!image) return;
  const unit = window.devicePixelRatio; // canvas pixels per CSS pixel
  const object = currentObject();
  const toDisplay = (value) => (value * marks.width) / image.width;
  const box = drag && drag.moved ? boxOf(drag.start, drag.end) : object && object.box;
  if (box) {
    context.lineWidth = 2 * unit;
    context.setLineDash([6 * unit, 4 * unit]);
    context.strokeStyle = "#ffffff";
    const [x0, y0, x1, y1] = box.map(toDisplay);
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    context.setLineDash([]);
    context.strokeStyle = object ? cssColour(object.colour) : "#111827";
    context.strokeRect(x0 - unit, y0 - unit, x1 - x0 + 2 * unit, y1 - y0 + 2 * unit);
  }
  if (!object) return;
  for (const point of object.points) {
    context.beginPath();
    context.arc(toDisplay(point.x), toDisplay(point.y), 6 * unit, 0, 2 * Math.PI);
    context.fillStyle = point.label === 1 ? "#16a34a" : "#dc2626";
    context.fill();
    context.lineWidth = 2 * unit;
    context.strokeStyle = "#ffffff";
    context.stroke();
  }
}

function describe(record) {
  const iou = record.predicted_iou.toFixed(3);
  const stability = record.stability_score.toFixed(3);
  return `IoU ${iou} · stability ${stability} · ${record.area.toLocaleString("en")} px`;
}

function renderPanels() {
  const object = currentObject();
  const list = $("candidates");
  list.replaceChildren();
  const candidates = object ? object.candidates : [];
  candidates.forEach((candidate, index) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("aria-pressed", String(index === object.selected));
    button.title = `Use this mask (${index + 1})`;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = cssColour(object.colour);
    button.append(swatch, `${index + 1} · ${describe(candidate.record)}`);
    button.addEventListener("click", () => chooseCandidate(index));
    item.append(button);
    list.append(item);
  });
  $("candidates-empty").hidden = candidates.length > 0;

  const count = state.objects.filter((other) => other.candidates.length > 0).length;
  $("object-count").textContent = `${count} ${count === 1 ? "object" : "objects"}`;
  const objects = $("objects");
  objects.replaceChildren();
  state.objects.forEach((other, index) => {
    const item = document.createElement("li");
    if (other.key === state.current) item.className = "current";
    const choose = document.createElement("button");
    choose.type = "button";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = cssColour(other.colour);
    const chosen = other.candidates[other.selected];
    const area = chosen ? `${chosen.record.area.toLocaleString("en")} px` : "…";
    choose.append(swatch, `Object ${index + 1} · ${area}`);
    choose.addEventListener("click", () => select(other.key));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Delete object ${index + 1}`);
    remove.addEventListener("click", () => deleteObject(other.key));
    item.append(choose, remove);
    objects.append(item);
  });
}

function updateControls() {
  updateBusy();
  const usable = Boolean(state.image && state.image.usable);
  const hasMasks = state.objects.some((object) => object.candidates.length > 0);
  $("undo").disabled = state.undo.length === 0;
  $("redo").disabled = state.redo.length === 0;
  $("clear").disabled = state.objects.length === 0;
  $("new-object").disabled = state.current === null;
  $("everything").disabled = !usable || state.everything !== null;
  for (const id of ["download-png", "download-coco", "download-overlay"]) {
    $(id).disabled = !hasMasks;
  }
}

function updateBusy() {
  const image = state.image;
  const encoding = Boolean(image && !image.usable && !image.failed);
  $("busy").hidden = inFlight.size === 0 && !encoding;
}

// --- pointer ---------------------------------------------------------------------------------

function imagePoint(event) {
  const rect = marks.getBoundingClientRect();
  const image = state.image;
  const x = ((event.clientX - rect.left) / rect.width) * image.width;
  const y = ((event.clientY - rect.top) / rect.height) * image.height;
  const clamp = (value, high) => Math.round(Math.min(Math.max(value, 0), high) * 10) / 10;
  return { x: clamp(x, image.width), y: clamp(y, image.height) };
}

function boxOf(a, b) {
  return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
}

marks.addEventListener("contextmenu", (event) => event.preventDefault());

marks.addEventListener("pointerdown", (event) => {
  if (!state.image || state.image.failed || (event.button !== 0 && event.button !== 2)) return;
  event.preventDefault();
  marks.setPointerCapture(event.pointerId);
  const negative = event.button === 2 || event.shiftKey || $("mode-remove").checked;
  const start = imagePoint(event);
  drag = { start, end: start, x: event.clientX, y: event.clientY, negative, moved: false };
});

marks.addEventListener("pointermove", (event) => {
  if (!drag) return;
  drag.end = imagePoint(event);
  const distance = Math.hypot(event.clientX - drag.x, event.clientY - drag.y);
  if (distance > DRAG_THRESHOLD_PX) drag.moved = true;
  if (drag.moved) drawMarks();
});

marks.addEventListener("pointerup", (event) => {
  if (!drag) return;
  const done = drag;
  drag = null;
  done.end = imagePoint(event);
  if (done.moved) {
    const box = boxOf(done.start, done.end);
    if (box[2] > box[0] && box[3] > box[1]) setBox(box);
    else drawMarks();
  } else {
    addPoint(done.start.x, done.start.y, done.negative ? 0 : 1);
  }
});

marks.addEventListener("pointercancel", () => {
  drag = null;
  drawMarks();
});

window.addEventListener("resize", fitView);

// --- uploads: picker, drop, paste ------------------------------------------------------------

for (const input of [$("file-input"), $("file-input-empty")]) {
  input.addEventListener("change", () => {
    loadFile(input.files[0]);
    input.value = "";
  });
}

const stage = $("stage");
stage.addEventListener("dragover", (event) => {
  if (!event.dataTransfer.types.includes("Files")) return;
  event.preventDefault();
  stage.classList.add("dragging");
});
stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
stage.addEventListener("drop", (event) => {
  event.preventDefault();
  stage.classList.remove("dragging");
  loadFile(event.dataTransfer.files[0]);
});

document.addEventListener("paste", (event) => {
  const file = [...event.clipboardData.files][0];
  if (file) {
    event.preventDefault();
    loadFile(file);
  }
});

// --- buttons and keys ------------------------------------------------------------------------

$("error-close").addEventListener("click", hideError);
$("new-object").addEventListener("click", startNewObject);
$("undo").addEventListener("click", undo);
$("redo").addEventListener("click", redo);
$("clear").addEventListener("click", clearObjects);
$("everything-form").addEventListener("submit", (event) => {
  event.preventDefault();
  runEverything();
});
$("everything-cancel").addEventListener("click", cancelEverything);

function baseName() {
  return (state.image.name || "image").replace(/\.[^.]+$/, "");
}

$("download-coco").addEventListener("click", () => {
  const objects = shownMasks().map(({ object, candidate }) => ({
    record: candidate.record,
    prompt: object.source === "prompt" ? promptOf(object) : null,
  }));
  const text = JSON.stringify(cocoDocument(state.image, objects), null, 1);
  download(new Blob([text], { type: "application/json" }), `${baseName()}.coco.json`);
});

$("download-png").addEventListener("click", async () => {
  const status = $("download-status");
  const button = $("download-png");
  button.disabled = true;
  try {
    const masks = shownMasks().map(({ candidate }) => candidate.mask);
    const archive = await masksZip(masks, (done, total) => {
      status.textContent = `Preparing masks… ${done} / ${total}`;
    });
    download(archive, `${baseName()}.masks.zip`);
    status.textContent = `${masks.length} masks saved.`;
  } catch (error) {
    showError(error);
  } finally {
    updateControls();
  }
});

$("download-overlay").addEventListener("click", () => {
  view.toBlob((blob) => download(blob, `${baseName()}.overlay.png`), "image/png");
});

document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target instanceof HTMLInputElement && target.type !== "radio" && target.type !== "checkbox") {
    return;
  }
  if (target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement) return;
  const key = event.key.toLowerCase();
  const command = event.ctrlKey || event.metaKey;
  if (command && key === "z") {
    event.preventDefault();
    if (event.shiftKey) redo();
    else undo();
  } else if (command && key === "y") {
    event.preventDefault();
    redo();
  } else if (command || event.altKey) {
    return;
  } else if (key === "escape") {
    if (drag) {
      drag = null;
      drawMarks();
    } else if (state.everything) cancelEverything();
    else hideError();
  } else if (key === "n" || key === "enter") {
    if (event.target instanceof HTMLButtonElement && key === "enter") return;
    startNewObject();
  } else if (["1", "2", "3"].includes(key)) {
    chooseCandidate(Number(key) - 1);
  } else if (key === "a") {
    $("mode-add").checked = true;
  } else if (key === "r") {
    $("mode-remove").checked = true;
  } else if (key === "delete" || key === "backspace") {
    if (state.current !== null) deleteObject(state.current);
  } else if (key === "c") {
    clearObjects();
  } else if (key === "e") {
    runEverything();
  } else if (key === "o") {
    $("file-input").click();
  } else {
    return;
  }
  event.preventDefault();
});

render();
