// The OneStage page: show an image as the model reads it (POST /display), send it to POST /segment, decode
// the COCO RLE masks here, draw them over the image in one zoomable view, list the instances. No framework
// and nothing fetched from outside the service.
//
// The RLE decoder and the colour rule are exported (and the page wires itself up only where there is a
// document) so that Node tests them: tests/web/rle.test.mjs checks the decoder against pycocotools.

// ------------------------------------------------------------------ COCO RLE
/**
 * Run lengths of a COCO compressed RLE string (pycocotools' rleFrString): column-major runs of the
 * [h, w] mask, starting with a run of zeros. Each count is a little-endian base-32 number in chars
 * offset by 48 (bit 0x20: more chars follow; 0x10 in the last char: negative), and from the fourth count
 * on it is stored as the difference to the count two before.
 * @param {string} counts
 * @returns {Float64Array} run lengths (exact integers)
 */
export function rleRuns(counts) {
  const runs = new Float64Array(counts.length);
  let m = 0;
  let p = 0;
  while (p < counts.length) {
    let x = 0;
    let shift = 1; // 32 ** k, kept as a float so counts above 2**31 stay exact
    let more = true;
    while (more) {
      if (p >= counts.length) throw new Error("truncated RLE counts string");
      const c = counts.charCodeAt(p) - 48;
      x += (c & 0x1f) * shift;
      shift *= 32;
      more = (c & 0x20) !== 0;
      p += 1;
      if (!more && (c & 0x10) !== 0) x -= shift; // sign extension of the last 5-bit group
    }
    if (m > 2) x += runs[m - 2];
    runs[m] = x;
    m += 1;
  }
  return runs.subarray(0, m);
}

/**
 * Write `value` into `target` (row-major, length height * width) at the mask's pixels; with
 * `onlyEmpty`, only where `target` is still 0 (so instances painted first keep overlapping pixels).
 * @param {{size: [number, number], counts: string}} rle
 * @param {Uint8Array|Uint16Array|Uint32Array} target
 * @param {number} value
 * @param {boolean} onlyEmpty
 * @returns {number} pixels in the mask
 */
export function paintRle(rle, target, value, onlyEmpty = false) {
  const [height, width] = rle.size;
  if (target.length !== height * width) throw new Error(`RLE of ${height}x${width} does not fit ${target.length} pixels`);
  const runs = rleRuns(rle.counts);
  let position = 0; // column-major index into the mask
  let area = 0;
  for (let r = 0; r < runs.length; r += 1) {
    const end = position + runs[r];
    if (r % 2 === 1) {
      area += runs[r];
      // Walk the run column by column: inside one column the row index runs contiguously.
      let k = position;
      while (k < end) {
        const x = Math.floor(k / height);
        const y0 = k - x * height;
        const y1 = Math.min(height, y0 + (end - k));
        for (let y = y0, i = y0 * width + x; y < y1; y += 1, i += width) {
          if (!onlyEmpty || target[i] === 0) target[i] = value;
        }
        k += y1 - y0;
      }
    }
    position = end;
  }
  if (position !== height * width) throw new Error(`RLE covers ${position} pixels, not ${height}x${width}`);
  return area;
}

/**
 * The binary mask of a COCO compressed RLE, row-major: mask[y * width + x] is 1 inside.
 * @param {{size: [number, number], counts: string}} rle
 * @returns {Uint8Array}
 */
export function decodeRle(rle) {
  const mask = new Uint8Array(rle.size[0] * rle.size[1]);
  paintRle(rle, mask, 1);
  return mask;
}

// ------------------------------------------------------------------ colours
const GOLDEN_RATIO_CONJUGATE = 0.618033988749895;
const SATURATION = 0.85;
const VALUE = 0.95;

/**
 * Instance i's colour, the rule of service/render.py (`instance_colours`): hue frac(i * golden ratio).
 * @param {number} index
 * @returns {[number, number, number]} RGB 0-255
 */
export function instanceColour(index) {
  const hue = (index * GOLDEN_RATIO_CONJUGATE) % 1;
  const sector = Math.floor(hue * 6);
  const f = hue * 6 - sector;
  const p = VALUE * (1 - SATURATION);
  const q = VALUE * (1 - SATURATION * f);
  const t = VALUE * (1 - SATURATION * (1 - f));
  const rgb = [[VALUE, t, p], [q, VALUE, p], [p, VALUE, t], [p, q, VALUE], [t, p, VALUE], [VALUE, p, q]][sector % 6];
  return rgb.map((c) => Math.round(c * 255));
}

// ------------------------------------------------------------------ API errors
/**
 * A sentence for a person from an error answer of the API ({"error": ...} bodies).
 * @param {number} status
 * @param {string} detail the API's message (or the body text)
 * @param {string|null} retryAfter the Retry-After header
 */
export function describeError(status, detail, retryAfter = null) {
  const said = detail ? ` The service said: ${detail}` : "";
  switch (status) {
    case 401:
      return `This service needs an API key (HTTP 401). Enter it in the "API key" field and try again.${said}`;
    case 403:
      return `This API key may not use the service (HTTP 403).${said}`;
    case 404:
      return `Not found (HTTP 404): pick another model.${said}`;
    case 413:
      return `The image is too large for this service (HTTP 413).${said}`;
    case 415:
      return `That file is not an image the service can read (HTTP 415): use JPEG, PNG, WebP, BMP or TIFF.${said}`;
    case 400:
      return `The image could not be decoded (HTTP 400).${said}`;
    case 422:
      return `The service refused the request's settings (HTTP 422).${said}`;
    case 503:
      return `The service is busy or still loading its models (HTTP 503)${retryAfter ? `; try again in ${retryAfter} s` : ""}.${said}`;
    case 504:
      return `The service did not answer in time (HTTP 504); try again.${said}`;
    default:
      return `The service answered HTTP ${status}.${said}`;
  }
}

// ------------------------------------------------------------------ display arithmetic
/**
 * The display contrast as a lookup table of the 256 grey levels: `black` and `white` map to 0 and 255,
 * values between follow t ** gamma (below 1 brightens dim objects). (0, 255, 1) is the identity: the image
 * exactly as the model reads it.
 * @param {number} black
 * @param {number} white
 * @param {number} gamma
 * @returns {Uint8ClampedArray}
 */
export function contrastTable(black, white, gamma) {
  const table = new Uint8ClampedArray(256);
  const span = Math.max(white - black, 1);
  for (let level = 0; level < 256; level += 1) {
    const t = Math.min(Math.max((level - black) / span, 0), 1);
    table[level] = Math.round(255 * t ** gamma);
  }
  return table;
}

/** A number for people: three significant digits at most (26.4, 1.75, 0.5). */
function short(value) {
  return String(Number(value.toPrecision(3)));
}

/**
 * Each label's extent in a label image: [x0, y0, x1, y1) per instance (label i + 1 at 4 * i), in pixels;
 * (Infinity, Infinity, -Infinity, -Infinity) for a label with no pixel.
 * @param {Uint32Array} labels row-major, 0 background
 * @param {number} width
 * @param {number} count labels 1..count
 * @returns {Float64Array}
 */
function labelExtents(labels, width, count) {
  const extents = new Float64Array(4 * count);
  for (let k = 0; k < count; k += 1) extents.set([Infinity, Infinity, -Infinity, -Infinity], 4 * k);
  for (let i = 0, y = 0; i < labels.length; y += 1) {
    for (let x = 0; x < width; x += 1, i += 1) {
      const label = labels[i];
      if (label === 0) continue;
      const o = 4 * (label - 1);
      if (x < extents[o]) extents[o] = x;
      if (y < extents[o + 1]) extents[o + 1] = y;
      if (x >= extents[o + 2]) extents[o + 2] = x + 1;
      if (y >= extents[o + 3]) extents[o + 3] = y + 1;
    }
  }
  return extents;
}

// ------------------------------------------------------------------ the page
const API_KEY_STORAGE = "onestage-api-key";
const FILL_ALPHA = 0.4; // as service/render.py
const HOVER_FILL_ALPHA = 0.7;
const REQUEST_DEBOUNCE_MS = 250;
const BACKGROUND = "#111";
// The view: canvas pixels per image pixel from MIN_ZOOM_OF_FIT times the zoom that fits the image, up to
// MAX_ZOOM (a nucleus 10 pixels across then fills the view).
const MAX_ZOOM = 64;
const MIN_ZOOM_OF_FIT = 0.5;
const WHEEL_ZOOM_RATE = 0.002; // zoom factor exp(-rate * wheel pixels): one 100-pixel notch is 1.22x
const WHEEL_LINE_PX = 16; // a wheel delta counted in lines (deltaMode 1), in pixels
const WHEEL_PAGE_PX = 400; // ... in pages (deltaMode 2)
const KEY_ZOOM = 1.5;
const KEY_PAN_SHARE = 0.1; // an arrow key pans by this share of the view
const PAN_MARGIN_PX = 48; // panning keeps at least this much of the image in view
const MIN_VIEW_HEIGHT_PX = 320; // a wide field keeps room to zoom into...
const MAX_VIEW_HEIGHT_SHARE = 0.75; // ...and a tall one leaves the window room for the controls
// What the object size options send, and what the answer's readout says about the scale it ran at.
const SIZE_OPTIONS = {
  model: { field: null, why: "" },
  auto: { field: null, why: "measured by scale=auto" },
  diameter: { field: "Diameter (px)", why: "from your diameter" },
  scale: { field: "Scale (×)", why: "yours" },
};

function startPage() {
  const $ = (id) => document.getElementById(id);
  const el = {
    file: $("file"), dropzone: $("dropzone"), model: $("model"), channel: $("channel"), threshold: $("threshold"),
    thresholdValue: $("threshold-value"), sizeMode: $("size-mode"), sizeValue: $("size-value"),
    sizeValueName: $("size-value-name"), expected: $("expected"), apiKey: $("api-key"), fill: $("show-fill"),
    outline: $("show-outline"), boxes: $("show-boxes"), black: $("black"), white: $("white"), gamma: $("gamma"),
    blackValue: $("black-value"), whiteValue: $("white-value"), gammaValue: $("gamma-value"),
    contrastReset: $("contrast-reset"), downloadJson: $("download-json"), downloadPng: $("download-png"),
    message: $("message"), warnings: $("warnings"), status: $("status"), figure: $("figure"), canvas: $("canvas"),
    zoomIn: $("zoom-in"), zoomOut: $("zoom-out"), zoomFit: $("zoom-fit"), zoomOne: $("zoom-one"),
    zoomValue: $("zoom-value"), count: $("count"), sizing: $("sizing"), note: $("note"), table: $("instances"),
  };
  const ctx = el.canvas.getContext("2d");
  // The image at its own size with the instances drawn over it: the view shows it zoomed and panned (image
  // and masks are one bitmap, so they stay aligned at every zoom), and "Download overlay PNG" saves it.
  const composite = document.createElement("canvas");
  const compositeCtx = composite.getContext("2d", { willReadFrequently: true });
  const state = {
    file: null, // the chosen File
    fileSerial: 0, // counts chosen files: a display fetched for an earlier one is dropped
    base: null, // ImageData: the image as the model reads it (POST /display), at its own size
    displayKey: null, // the file, model and channel `base` is (or is being fetched) for
    answer: null, // the last successful /segment JSON
    sizeMode: "auto", // the object size option the shown answer was asked with
    labels: null, // Uint32Array [h * w]: 0 background, i + 1 = instance i (the higher score keeps overlaps)
    extents: null, // Float64Array [4 * instances]: each instance's [x0, y0, x1, y1) in the label image
    colours: [],
    hovered: -1,
    frame: null, // ImageData the composite is computed in, kept while the image size holds
    composed: false, // whether the composite holds an image
    view: { scale: 1, x: 0, y: 0 }, // canvas pixel = image pixel * scale + (x, y); x and y whole pixels
    fitted: true, // the view shows the whole image (and refits when the page resizes) until zoomed or panned
    drag: null, // a pan in progress: where it started, and the view then
    sort: { key: "id", descending: false },
    request: 0, // sequence number: answers to superseded requests are dropped
    models: new Map(), // name -> GET /models entry
    thresholdMoved: false, // the person moved the slider: stop following the model's recommended threshold
    sizeChosen: false, // the person chose an object size option: stop following the model's default (the API's)
  };

  function showError(text) {
    el.message.textContent = text;
    el.message.hidden = false;
  }
  function clearError() {
    el.message.hidden = true;
    el.message.textContent = "";
  }
  function setStatus(text) {
    el.status.textContent = text;
  }
  window.addEventListener("error", (event) => {
    // Chromium reports a ResizeObserver callback that resized what it observes as an error event; the next
    // frame delivers the rest, so it is no failure of the page's.
    if (String(event.message).startsWith("ResizeObserver loop")) return;
    showError(`Something went wrong in the page: ${event.message}`);
  });
  window.addEventListener("unhandledrejection", (event) => showError(`Something went wrong in the page: ${event.reason}`));

  function headers(extra = {}) {
    const key = el.apiKey.value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  async function errorText(response) {
    const text = await response.text();
    let detail = text.trim().slice(0, 500);
    try {
      detail = JSON.parse(text).error ?? detail;
    } catch {
      // not JSON (a proxy's page, say): show the text itself
    }
    return describeError(response.status, detail, response.headers.get("Retry-After"));
  }

  // ---------------------------------------------------------------- models
  async function loadModels() {
    let response;
    try {
      response = await fetch("/models", { headers: headers() });
    } catch (error) {
      showError(`Could not reach the service to list its models: ${error.message}`);
      setStatus("");
      return;
    }
    if (!response.ok) {
      showError(await errorText(response));
      setStatus("");
      return;
    }
    const { models } = await response.json();
    const chosen = el.model.value;
    el.model.replaceChildren(...models.map((m) => {
      const option = new Option(m.state === "ready" ? m.name : `${m.name} (${m.state})`, m.name);
      option.disabled = m.state !== "ready";
      return option;
    }));
    if (models.some((m) => m.name === chosen)) el.model.value = chosen;
    state.models = new Map(models.map((m) => [m.name, m]));
    followRecommendedThreshold();
    updateSizeControls(false);
    const loading = models.filter((m) => m.state === "loading").length;
    setStatus(loading ? `${loading} model(s) still loading…` : "Choose an image.");
    if (loading) setTimeout(loadModels, 2000);
  }

  // The slider starts at the chosen model's recommended threshold (the API's and the CLI's default too) and
  // follows the model until the person moves it.
  function followRecommendedThreshold() {
    const recommended = state.models.get(el.model.value)?.recommended_score_threshold;
    if (state.thresholdMoved || recommended == null) return;
    el.threshold.value = recommended;
    el.thresholdValue.value = Number(el.threshold.value).toFixed(2);
  }

  // ---------------------------------------------------------------- object size
  // auto and a diameter need a model that records its training object size (the API answers 422 otherwise);
  // `prefill` (a new size option chosen) puts the model's own value in the number field (its expected
  // diameter, or scale 1).
  function updateSizeControls(prefill) {
    const model = state.models.get(el.model.value);
    const sized = model === undefined || model.input?.object_size != null; // not listed yet: leave the choice be
    for (const option of el.sizeMode.options) {
      if (option.value === "auto" || option.value === "diameter") option.disabled = !sized;
    }
    // The API's default: auto for a model that records its object size, its own scale for one that does not.
    if (!state.sizeChosen) el.sizeMode.value = sized ? "auto" : "model";
    if (!sized && (el.sizeMode.value === "auto" || el.sizeMode.value === "diameter")) el.sizeMode.value = "model";
    const { field } = SIZE_OPTIONS[el.sizeMode.value];
    el.sizeValue.disabled = field === null;
    el.sizeValueName.textContent = field ?? "Value";
    if (field === null) el.sizeValue.value = "";
    else if (prefill) {
      const expected = model?.expected_diameter;
      el.sizeValue.value = el.sizeMode.value === "scale" ? "1" : expected != null ? short(expected) : "";
    }
    const expected = model?.expected_diameter;
    el.expected.textContent = expected != null
      ? `The model expects objects about ${short(expected)} px across at its own scale.`
      : sized ? "" : "This model records no object size: its own scale or a scale factor.";
  }

  /** The size parameters of a request, or null (with a message shown) when the number field is unusable. */
  function sizeParams() {
    const mode = el.sizeMode.value;
    if (mode === "model") return { scale: "1" };
    if (mode === "auto") return { scale: "auto" }; // the API's default for models that record their object size
    const value = Number(el.sizeValue.value);
    if (el.sizeValue.value.trim() === "" || !(value > 0)) {
      showError(mode === "diameter"
        ? "Enter the objects' typical diameter in pixels of your image (a number above 0), or choose another size option."
        : "Enter a scale factor above 0 (0.5 for images at twice the training magnification), or choose another size option.");
      return null;
    }
    return { [mode]: String(value) };
  }

  /** "Ran at 3× (scale 1.5 from your diameter on the model's own 2×), assuming objects 13.2 px across." */
  function describeSizing(answer, mode) {
    const own = answer.resize_factor / answer.scale;
    const how = mode === "model"
      ? "the model's own scale"
      : `scale ${short(answer.scale)} ${SIZE_OPTIONS[mode].why} on the model's own ${short(own)}×`;
    let text = `Ran at ${short(answer.resize_factor)}× (${how})`;
    if (answer.diameter != null) text += `, assuming objects ${short(answer.diameter)} px across`;
    return `${text}.`;
  }

  // ---------------------------------------------------------------- the image and its answer
  let debounce = 0;
  function segmentSoon() {
    clearTimeout(debounce);
    if (state.file) debounce = setTimeout(segment, REQUEST_DEBOUNCE_MS);
  }

  async function chooseFile(file) {
    state.file = file;
    state.fileSerial += 1;
    state.base = null;
    state.displayKey = null;
    state.fitted = true;
    delete el.canvas.dataset.image;
    show(null);
    await Promise.all([loadDisplay(), segment()]);
  }

  /** The image's pixels as the chosen model reads them, from POST /display (once per file, model and channel). */
  async function loadDisplay() {
    if (!state.file) return;
    const key = `${state.fileSerial}|${el.model.value}|${el.channel.value}`;
    if (key === state.displayKey) return;
    state.displayKey = key;
    const params = new URLSearchParams();
    if (el.model.value) params.set("model", el.model.value);
    if (el.channel.value !== "") params.set("channel", el.channel.value);
    const stale = () => key !== state.displayKey;
    const fail = (text) => {
      state.displayKey = null; // fetched again on the next change (an API key typed, another model)
      state.base = null;
      delete el.canvas.dataset.image;
      showError(text);
      refresh();
    };
    let response;
    try {
      response = await fetch(`/display?${params}`, {
        method: "POST",
        headers: headers({ "Content-Type": state.file.type || "application/octet-stream" }),
        body: state.file,
      });
    } catch (error) {
      if (!stale()) fail(`Could not reach the service: ${error.message}`);
      return;
    }
    if (!response.ok) {
      const text = await errorText(response);
      if (!stale()) fail(text);
      return;
    }
    let pixels;
    try {
      pixels = await imagePixels(await response.blob());
    } catch (error) {
      if (!stale()) fail(`This browser could not draw the service's picture of the image: ${error.message}`);
      return;
    }
    if (stale()) return;
    state.base = pixels;
    el.canvas.dataset.image = `${pixels.width}x${pixels.height}`;
    refresh();
  }

  async function imagePixels(blob) {
    // Exactly the PNG's levels: no colour management (the service's PNGs carry no colour profile).
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const scratch = document.createElement("canvas");
    scratch.width = bitmap.width;
    scratch.height = bitmap.height;
    const scratchCtx = scratch.getContext("2d", { willReadFrequently: true });
    scratchCtx.drawImage(bitmap, 0, 0);
    bitmap.close();
    return scratchCtx.getImageData(0, 0, scratch.width, scratch.height);
  }

  async function segment() {
    if (!state.file) return;
    const id = ++state.request;
    clearError();
    const size = sizeParams();
    if (size === null) return;
    const mode = el.sizeMode.value;
    const params = new URLSearchParams({ score_threshold: el.threshold.value, ...size });
    if (el.model.value) params.set("model", el.model.value);
    if (el.channel.value !== "") params.set("channel", el.channel.value);
    setStatus(`Segmenting ${state.file.name}…`);
    const started = performance.now();
    let response;
    try {
      response = await fetch(`/segment?${params}`, {
        method: "POST",
        headers: headers({ "Content-Type": state.file.type || "application/octet-stream" }),
        body: state.file,
      });
    } catch (error) {
      if (id !== state.request) return;
      show(null);
      showError(`Could not reach the service: ${error.message}`);
      setStatus("");
      return;
    }
    if (id !== state.request) return;
    if (!response.ok) {
      const text = await errorText(response);
      if (id !== state.request) return;
      show(null);
      showError(text);
      setStatus("");
      return;
    }
    const answer = await response.json();
    if (id !== state.request) return;
    show(answer, mode);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    setStatus(`${answer.model} (${answer.version}) on ${state.file.name}, ${answer.width}x${answer.height}, `
      + `score threshold ${answer.score_threshold.toFixed(2)}, in ${seconds} s`);
  }

  function show(answer, mode = state.sizeMode) {
    state.answer = answer;
    state.sizeMode = mode;
    state.hovered = -1;
    state.labels = null;
    el.note.textContent = "";
    if (answer) {
      state.colours = answer.instances.map((_, i) => instanceColour(i));
      state.labels = new Uint32Array(answer.width * answer.height);
      answer.instances.forEach((instance, i) => {
        if (instance.segmentation && !Array.isArray(instance.segmentation)) paintRle(instance.segmentation, state.labels, i + 1, true);
      });
      state.extents = labelExtents(state.labels, answer.width, answer.instances.length);
      el.count.textContent = `${answer.instances.length} instance${answer.instances.length === 1 ? "" : "s"}`;
      el.count.dataset.count = String(answer.instances.length);
      el.sizing.textContent = describeSizing(answer, mode);
      Object.assign(el.sizing.dataset, {
        mode, scale: String(answer.scale), resizeFactor: String(answer.resize_factor), diameter: String(answer.diameter ?? ""),
      });
    } else {
      el.count.textContent = state.file ? "No result." : "No image yet.";
      el.count.dataset.count = "";
      el.sizing.textContent = "";
      el.sizing.dataset.mode = "";
    }
    showWarnings(answer?.warnings ?? []);
    el.downloadJson.disabled = el.downloadPng.disabled = !answer;
    refresh();
    fillTable();
  }

  function showWarnings(warnings) {
    el.warnings.querySelector("ul").replaceChildren(...warnings.map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }));
    el.warnings.hidden = warnings.length === 0;
  }

  // ---------------------------------------------------------------- drawing: the composite
  function imageSize() {
    if (state.base) return [state.base.width, state.base.height];
    if (state.answer) return [state.answer.width, state.answer.height];
    return [0, 0];
  }

  function lineWidth(width, height) {
    return Math.max(1, Math.round(Math.min(width, height) / 400)); // outlines and boxes, as the PNG's
  }

  /**
   * The image with the display contrast and the instances, at the image's own size, into the composite;
   * only inside `region` ([x0, y0, x1, y1], image pixels) when given: a hover changes two instances, and
   * recomputing a 40-megapixel field for each would make the pointer lag.
   */
  function compose(hovered = state.hovered, region = null) {
    const [width, height] = imageSize();
    state.composed = width > 0 && height > 0;
    if (!state.composed) {
      paint();
      return;
    }
    if (composite.width !== width || composite.height !== height || !state.frame) {
      composite.width = width;
      composite.height = height;
      state.frame = compositeCtx.createImageData(width, height);
      region = null;
    }
    const [x0, y0, x1, y1] = region ?? [0, 0, width, height];
    const px = state.frame.data;
    const base = state.base;
    const lut = base ? contrastTable(Number(el.black.value), Number(el.white.value), Number(el.gamma.value)) : null;
    for (let y = y0; y < y1; y += 1) {
      for (let o = (y * width + x0) * 4, end = (y * width + x1) * 4; o < end; o += 4) {
        // No image (yet): the masks on black.
        px[o] = lut ? lut[base.data[o]] : 0;
        px[o + 1] = lut ? lut[base.data[o + 1]] : 0;
        px[o + 2] = lut ? lut[base.data[o + 2]] : 0;
        px[o + 3] = 255;
      }
    }
    const answer = state.answer;
    const aligned = answer && state.labels && answer.width === width && answer.height === height;
    el.note.textContent = answer && !aligned
      ? `(the image shown is ${width}x${height}, the answer is for ${answer.width}x${answer.height}: masks not drawn)` : "";
    if (aligned && (el.fill.checked || el.outline.checked)) paintMasks(px, width, height, hovered, [x0, y0, x1, y1]);
    compositeCtx.putImageData(state.frame, 0, 0, x0, y0, x1 - x0, y1 - y0);
    if (aligned) {
      // Boxes are stroked inside the recomputed region only, so no stroke is drawn twice over itself.
      compositeCtx.save();
      compositeCtx.beginPath();
      compositeCtx.rect(x0, y0, x1 - x0, y1 - y0);
      compositeCtx.clip();
      paintBoxes(lineWidth(width, height), hovered);
      compositeCtx.restore();
    }
    paint();
  }

  function paintMasks(px, width, height, hovered, [x0, y0, x1, y1]) {
    const fill = el.fill.checked;
    const outline = el.outline.checked;
    const labels = state.labels;
    const t = lineWidth(width, height);
    for (let y = y0; y < y1; y += 1) {
      for (let x = x0, i = y * width + x0; x < x1; x += 1, i += 1) {
        const label = labels[i];
        if (label === 0) continue;
        const [r, g, b] = state.colours[label - 1];
        const edge = outline && (
          x < t || y < t || x >= width - t || y >= height - t
          || labels[i - t] !== label || labels[i + t] !== label
          || labels[i - t * width] !== label || labels[i + t * width] !== label);
        const o = i * 4;
        if (edge) {
          px[o] = r; px[o + 1] = g; px[o + 2] = b;
        } else if (fill) {
          const a = label - 1 === hovered ? HOVER_FILL_ALPHA : FILL_ALPHA;
          px[o] = px[o] * (1 - a) + r * a;
          px[o + 1] = px[o + 1] * (1 - a) + g * a;
          px[o + 2] = px[o + 2] * (1 - a) + b * a;
        }
      }
    }
  }

  function paintBoxes(line, hovered) {
    state.answer.instances.forEach((instance, i) => {
      if (!(el.boxes.checked || i === hovered || !instance.segmentation)) return;
      const [x, y, w, h] = instance.bbox;
      const [r, g, b] = state.colours[i];
      compositeCtx.lineWidth = i === hovered ? 2 * line : line;
      compositeCtx.strokeStyle = i === hovered ? "#fff" : `rgb(${r} ${g} ${b})`;
      compositeCtx.strokeRect(x, y, w, h);
    });
  }

  // ---------------------------------------------------------------- drawing: the view
  function pixelRatio() {
    return window.devicePixelRatio || 1;
  }

  /** The canvas as wide as its column and as tall as the image at that width, within the view's limits. */
  function layout() {
    const [width, height] = imageSize();
    const cssWidth = el.canvas.clientWidth;
    const aspect = width && height ? width / height : 4 / 3;
    const cssHeight = Math.round(Math.min(Math.max(cssWidth / aspect, MIN_VIEW_HEIGHT_PX), window.innerHeight * MAX_VIEW_HEIGHT_SHARE));
    el.canvas.style.height = `${cssHeight}px`;
    const [w, h] = [Math.round(cssWidth * pixelRatio()), Math.round(cssHeight * pixelRatio())];
    if (el.canvas.width !== w || el.canvas.height !== h) {
      el.canvas.width = w;
      el.canvas.height = h;
    }
    if (state.fitted) fit();
  }

  function refresh() {
    layout();
    compose();
  }

  function fitScale() {
    const [width, height] = imageSize();
    return Math.min(el.canvas.width / width, el.canvas.height / height);
  }

  function fit() {
    const [width, height] = imageSize();
    if (!width || !height) {
      paint();
      return;
    }
    const scale = fitScale();
    setView({ scale, x: (el.canvas.width - width * scale) / 2, y: (el.canvas.height - height * scale) / 2 }, true);
  }

  function setView(view, fitted = false) {
    const [width, height] = imageSize();
    const margin = PAN_MARGIN_PX * pixelRatio();
    const clamp = (value, low, high) => Math.min(Math.max(value, low), high);
    state.view = {
      scale: view.scale,
      x: Math.round(clamp(view.x, margin - width * view.scale, el.canvas.width - margin)),
      y: Math.round(clamp(view.y, margin - height * view.scale, el.canvas.height - margin)),
    };
    state.fitted = fitted;
    paint();
  }

  /** Zoom to `scale` canvas pixels per image pixel, keeping the image point under canvas point (cx, cy). */
  function zoomTo(scale, cx, cy) {
    if (!state.composed) return;
    const fitted = fitScale();
    const next = Math.min(Math.max(scale, fitted * MIN_ZOOM_OF_FIT), Math.max(MAX_ZOOM, fitted));
    const { scale: now, x, y } = state.view;
    setView({ scale: next, x: cx - ((cx - x) * next) / now, y: cy - ((cy - y) * next) / now });
  }

  function zoomAround(factor, cx = el.canvas.width / 2, cy = el.canvas.height / 2) {
    zoomTo(state.view.scale * factor, cx, cy);
  }

  function panBy(dx, dy) {
    if (state.composed) setView({ ...state.view, x: state.view.x + dx, y: state.view.y + dy });
  }

  /** The view onto the canvas: the composite under the view's transform, enlarged pixels kept square. */
  function paint() {
    const { scale, x, y } = state.view;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = BACKGROUND;
    ctx.fillRect(0, 0, el.canvas.width, el.canvas.height);
    // The transform, for whoever maps the canvas back to the image (the tests): canvas pixel (u, v) shows
    // image pixel (floor((u + 0.5 - originX) / scale), floor((v + 0.5 - originY) / scale)).
    Object.assign(el.canvas.dataset, { scale: String(scale), originX: String(x), originY: String(y) });
    el.zoomValue.value = state.composed ? `${Math.round((100 * scale) / pixelRatio())}%` : "–";
    if (!state.composed) return;
    ctx.imageSmoothingEnabled = scale < 1;
    ctx.imageSmoothingQuality = "high";
    ctx.setTransform(scale, 0, 0, scale, x, y);
    ctx.drawImage(composite, 0, 0);
  }

  /** The canvas point and image pixel under a pointer event. */
  function pointAt(event) {
    const rect = el.canvas.getBoundingClientRect();
    const cx = ((event.clientX - rect.left) * el.canvas.width) / rect.width;
    const cy = ((event.clientY - rect.top) * el.canvas.height) / rect.height;
    const { scale, x, y } = state.view;
    // The pixel drawn there: the one whose area holds the canvas pixel's centre.
    return { cx, cy, ix: Math.floor((Math.floor(cx) + 0.5 - x) / scale), iy: Math.floor((Math.floor(cy) + 0.5 - y) / scale) };
  }

  el.canvas.addEventListener("wheel", (event) => {
    if (!state.composed) return;
    event.preventDefault();
    const pixels = event.deltaY * (event.deltaMode === 1 ? WHEEL_LINE_PX : event.deltaMode === 2 ? WHEEL_PAGE_PX : 1);
    const { cx, cy } = pointAt(event);
    zoomAround(Math.exp(-pixels * WHEEL_ZOOM_RATE), cx, cy);
  }, { passive: false });

  el.canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || !state.composed) return;
    el.canvas.setPointerCapture(event.pointerId);
    state.drag = { clientX: event.clientX, clientY: event.clientY, view: state.view };
    el.canvas.classList.add("dragging");
  });
  el.canvas.addEventListener("pointermove", (event) => {
    if (state.drag) {
      const k = el.canvas.width / el.canvas.getBoundingClientRect().width;
      const { clientX, clientY, view } = state.drag;
      setView({ ...view, x: view.x + (event.clientX - clientX) * k, y: view.y + (event.clientY - clientY) * k });
      return;
    }
    if (!state.labels || !state.answer) return;
    const { ix, iy } = pointAt(event);
    const { width, height } = state.answer;
    hover(ix >= 0 && iy >= 0 && ix < width && iy < height ? state.labels[iy * width + ix] - 1 : -1);
  });
  function endDrag(event) {
    if (!state.drag) return;
    state.drag = null;
    el.canvas.classList.remove("dragging");
    if (el.canvas.hasPointerCapture(event.pointerId)) el.canvas.releasePointerCapture(event.pointerId);
  }
  el.canvas.addEventListener("pointerup", endDrag);
  el.canvas.addEventListener("pointercancel", endDrag);
  el.canvas.addEventListener("pointerleave", () => {
    if (!state.drag) hover(-1);
  });
  el.canvas.addEventListener("keydown", (event) => {
    const pan = KEY_PAN_SHARE * Math.min(el.canvas.width, el.canvas.height);
    const actions = {
      "+": () => zoomAround(KEY_ZOOM),
      "=": () => zoomAround(KEY_ZOOM),
      "-": () => zoomAround(1 / KEY_ZOOM),
      0: fit,
      1: () => zoomAround(pixelRatio() / state.view.scale),
      ArrowLeft: () => panBy(pan, 0),
      ArrowRight: () => panBy(-pan, 0),
      ArrowUp: () => panBy(0, pan),
      ArrowDown: () => panBy(0, -pan),
    };
    const action = actions[event.key];
    if (!action || !state.composed || event.ctrlKey || event.metaKey || event.altKey) return;
    event.preventDefault();
    action();
  });
  el.zoomIn.addEventListener("click", () => zoomAround(KEY_ZOOM));
  el.zoomOut.addEventListener("click", () => zoomAround(1 / KEY_ZOOM));
  el.zoomFit.addEventListener("click", fit);
  el.zoomOne.addEventListener("click", () => zoomAround(pixelRatio() / state.view.scale));
  let laidOutWidth = 0;
  new ResizeObserver(() => {
    if (el.canvas.clientWidth === laidOutWidth) return; // the height is ours: only a new width lays out again
    laidOutWidth = el.canvas.clientWidth;
    layout();
  }).observe(el.figure);
  window.addEventListener("resize", layout);

  // ---------------------------------------------------------------- the table
  const columns = {
    id: (i) => i,
    category: (i) => state.answer.instances[i].category_name,
    score: (i) => state.answer.instances[i].score,
    area: (i) => state.answer.instances[i].area ?? -1,
    box: (i) => state.answer.instances[i].bbox[0],
  };

  function fillTable() {
    const body = el.table.tBodies[0];
    if (!state.answer) {
      body.replaceChildren();
      return;
    }
    const order = state.answer.instances.map((_, i) => i);
    const key = columns[state.sort.key];
    order.sort((a, b) => {
      const [ka, kb] = [key(a), key(b)];
      const cmp = typeof ka === "string" ? ka.localeCompare(kb) : ka - kb;
      return (state.sort.descending ? -cmp : cmp) || a - b;
    });
    body.replaceChildren(...order.map((i) => {
      const instance = state.answer.instances[i];
      const row = document.createElement("tr");
      row.dataset.index = String(i);
      const [r, g, b] = state.colours[i];
      const swatch = `<span class="swatch" style="background: rgb(${r} ${g} ${b})"></span>`;
      const cells = [
        `${swatch}${i + 1}`, escapeHtml(instance.category_name), instance.score.toFixed(3),
        instance.area ?? "–", instance.bbox.map((v) => v.toFixed(1)).join(", "),
      ];
      row.innerHTML = cells.map((c) => `<td>${c}</td>`).join("");
      row.addEventListener("mouseenter", () => hover(i));
      row.addEventListener("mouseleave", () => hover(-1));
      return row;
    }));
    for (const th of el.table.tHead.rows[0].cells) {
      th.setAttribute("aria-sort", th.dataset.key === state.sort.key ? (state.sort.descending ? "descending" : "ascending") : "none");
    }
  }

  function escapeHtml(text) {
    const span = document.createElement("span");
    span.textContent = text;
    return span.innerHTML;
  }

  function hover(index) {
    if (index === state.hovered) return;
    const before = state.hovered;
    state.hovered = index;
    for (const row of el.table.tBodies[0].rows) row.classList.toggle("hovered", Number(row.dataset.index) === index);
    el.table.tBodies[0].querySelector("tr.hovered")?.scrollIntoView({ block: "nearest" });
    compose(index, hoverRegion([before, index]));
  }

  /**
   * The image pixels a change of the hovered instances can touch: their boxes with the highlight's stroke,
   * and their pixels in the label image (a mask may reach past its box).
   */
  function hoverRegion(indices) {
    const [width, height] = imageSize();
    const reach = 2 * lineWidth(width, height) + 1;
    const region = [width, height, 0, 0];
    for (const i of indices.filter((index) => index >= 0)) {
      const [x, y, w, h] = state.answer.instances[i].bbox;
      const extent = state.extents.subarray(4 * i, 4 * i + 4); // empty (Infinity, -Infinity) for no pixels
      region[0] = Math.min(region[0], Math.floor(x - reach), extent[0]);
      region[1] = Math.min(region[1], Math.floor(y - reach), extent[1]);
      region[2] = Math.max(region[2], Math.ceil(x + w + reach), extent[2]);
      region[3] = Math.max(region[3], Math.ceil(y + h + reach), extent[3]);
    }
    const [x0, y0, x1, y1] = [Math.max(0, region[0]), Math.max(0, region[1]), Math.min(width, region[2]), Math.min(height, region[3])];
    return x1 > x0 && y1 > y0 ? [x0, y0, x1, y1] : null;
  }

  function sortBy(event) {
    const key = event.target.closest("th")?.dataset.key;
    if (!key) return;
    event.preventDefault();
    // A new column sorts best-first for score and area, A-Z or low-high otherwise; the same column flips.
    state.sort = { key, descending: state.sort.key === key ? !state.sort.descending : key === "score" || key === "area" };
    fillTable();
  }
  el.table.tHead.addEventListener("click", sortBy);
  el.table.tHead.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") sortBy(event);
  });

  // ---------------------------------------------------------------- downloads
  function stem() {
    return (state.file?.name ?? "image").replace(/\.[^.]*$/, "");
  }
  function save(blob, name) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }
  el.downloadJson.addEventListener("click", () => {
    save(new Blob([JSON.stringify(state.answer, null, 1)], { type: "application/json" }), `${stem()}.json`);
  });
  el.downloadPng.addEventListener("click", () => {
    compose(-1); // the whole image as shown, without the hover highlight
    composite.toBlob((blob) => {
      save(blob, `${stem()}.overlay.png`);
      compose();
    }, "image/png");
  });

  // ---------------------------------------------------------------- inputs
  el.file.addEventListener("change", () => {
    if (el.file.files.length) chooseFile(el.file.files[0]);
  });
  el.dropzone.addEventListener("dragover", (event) => {
    event.preventDefault();
    el.dropzone.classList.add("over");
  });
  el.dropzone.addEventListener("dragleave", () => el.dropzone.classList.remove("over"));
  el.dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    el.dropzone.classList.remove("over");
    const file = event.dataTransfer?.files?.[0];
    if (file) chooseFile(file);
  });
  el.threshold.addEventListener("input", () => {
    state.thresholdMoved = true;
    el.thresholdValue.value = Number(el.threshold.value).toFixed(2);
    segmentSoon();
  });
  el.model.addEventListener("change", () => {
    followRecommendedThreshold();
    updateSizeControls(false); // a diameter typed is the image's, whichever model reads it
    loadDisplay();
    segmentSoon();
  });
  el.channel.addEventListener("change", () => {
    loadDisplay();
    segmentSoon();
  });
  el.sizeMode.addEventListener("change", () => {
    state.sizeChosen = true;
    updateSizeControls(true);
    segmentSoon();
  });
  el.sizeValue.addEventListener("change", segmentSoon);
  for (const toggle of [el.fill, el.outline, el.boxes]) toggle.addEventListener("change", () => compose());

  function contrastChanged(moved) {
    // The black point stays below the white point: the one not being moved gives way.
    const [black, white] = [Number(el.black.value), Number(el.white.value)];
    if (black >= white) {
      if (moved === el.black) el.white.value = String(black + 1);
      else el.black.value = String(white - 1);
    }
    el.blackValue.value = el.black.value;
    el.whiteValue.value = el.white.value;
    el.gammaValue.value = Number(el.gamma.value).toFixed(2);
    compose();
  }
  for (const slider of [el.black, el.white, el.gamma]) slider.addEventListener("input", () => contrastChanged(slider));
  el.contrastReset.addEventListener("click", () => {
    [el.black.value, el.white.value, el.gamma.value] = ["0", "255", "1"];
    contrastChanged(null);
  });

  el.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) ?? "";
  el.apiKey.addEventListener("change", () => {
    const key = el.apiKey.value.trim();
    if (key) sessionStorage.setItem(API_KEY_STORAGE, key);
    else sessionStorage.removeItem(API_KEY_STORAGE);
    clearError();
    loadModels().then(() => {
      loadDisplay();
      segmentSoon();
    });
  });

  layout();
  loadModels();
}

if (typeof document !== "undefined") {
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", startPage);
  else startPage();
}
