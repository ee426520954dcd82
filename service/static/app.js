// The OneStage page: send an image to POST /segment, decode the COCO RLE masks here, draw them over the
// image, list the instances. No framework and nothing fetched from outside the service.
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

// ------------------------------------------------------------------ the page
const API_KEY_STORAGE = "onestage-api-key";
const FILL_ALPHA = 0.4; // as service/render.py
const HOVER_FILL_ALPHA = 0.7;
const REQUEST_DEBOUNCE_MS = 250;

function startPage() {
  const $ = (id) => document.getElementById(id);
  const el = {
    file: $("file"), dropzone: $("dropzone"), model: $("model"), threshold: $("threshold"),
    thresholdValue: $("threshold-value"), scale: $("scale"), apiKey: $("api-key"), fill: $("show-fill"),
    outline: $("show-outline"), boxes: $("show-boxes"), downloadJson: $("download-json"),
    downloadPng: $("download-png"), message: $("message"), status: $("status"), canvas: $("canvas"),
    count: $("count"), note: $("note"), table: $("instances"),
  };
  const ctx = el.canvas.getContext("2d", { willReadFrequently: true });
  const state = {
    file: null, // the chosen File
    bitmap: null, // its decoded pixels, or null where the browser cannot show the format
    answer: null, // the last successful /segment JSON
    labels: null, // Uint32Array [h * w]: 0 background, i + 1 = instance i (the higher score keeps overlaps)
    colours: [],
    hovered: -1,
    sort: { key: "id", descending: false },
    request: 0, // sequence number: answers to superseded requests are dropped
    models: new Map(), // name -> GET /models entry
    thresholdMoved: false, // the person moved the slider: stop following the model's recommended threshold
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
  window.addEventListener("error", (event) => showError(`Something went wrong in the page: ${event.message}`));
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

  // ---------------------------------------------------------------- segmenting
  let debounce = 0;
  function segmentSoon() {
    clearTimeout(debounce);
    if (state.file) debounce = setTimeout(segment, REQUEST_DEBOUNCE_MS);
  }

  async function chooseFile(file) {
    state.file = file;
    state.answer = null;
    state.labels = null;
    state.bitmap?.close?.();
    state.bitmap = null;
    try {
      state.bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch {
      // TIFF, or not an image at all: the service decides; masks are then drawn on black
    }
    await segment();
  }

  async function segment() {
    if (!state.file) return;
    const id = ++state.request;
    clearError();
    const params = new URLSearchParams({ score_threshold: el.threshold.value });
    if (el.model.value) params.set("model", el.model.value);
    if (el.scale.value.trim() !== "") params.set("scale", el.scale.value.trim());
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
    show(answer);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    setStatus(`${answer.model} (${answer.version}) on ${state.file.name}, ${answer.width}x${answer.height}, in ${seconds} s`);
  }

  // ---------------------------------------------------------------- drawing
  function show(answer) {
    state.answer = answer;
    state.hovered = -1;
    state.labels = null;
    el.note.textContent = "";
    if (answer) {
      state.colours = answer.instances.map((_, i) => instanceColour(i));
      state.labels = new Uint32Array(answer.width * answer.height);
      answer.instances.forEach((instance, i) => {
        if (instance.segmentation && !Array.isArray(instance.segmentation)) paintRle(instance.segmentation, state.labels, i + 1, true);
      });
      if (!state.bitmap) el.note.textContent = "(this browser cannot show the image format: masks on black)";
      else if (state.bitmap.width !== answer.width || state.bitmap.height !== answer.height) {
        el.note.textContent = `(the browser shows the image at ${state.bitmap.width}x${state.bitmap.height}, the service read ${answer.width}x${answer.height})`;
      }
      el.count.textContent = `${answer.instances.length} instance${answer.instances.length === 1 ? "" : "s"}`;
      el.count.dataset.count = String(answer.instances.length);
    } else {
      el.count.textContent = state.file ? "No result." : "No image yet.";
      el.count.dataset.count = "";
    }
    el.downloadJson.disabled = el.downloadPng.disabled = !answer;
    draw();
    fillTable();
  }

  function draw(hovered = state.hovered) {
    const answer = state.answer;
    const width = answer ? answer.width : state.bitmap?.width ?? 0;
    const height = answer ? answer.height : state.bitmap?.height ?? 0;
    if (el.canvas.width !== width || el.canvas.height !== height) {
      el.canvas.width = width;
      el.canvas.height = height;
      if (width && height) el.canvas.style.setProperty("--aspect", String(width / height));
    }
    if (!width || !height) return;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    if (state.bitmap) ctx.drawImage(state.bitmap, 0, 0, width, height);
    if (!answer || !state.labels) return;

    const fill = el.fill.checked;
    const outline = el.outline.checked;
    if (fill || outline) {
      const image = ctx.getImageData(0, 0, width, height);
      const px = image.data;
      const labels = state.labels;
      const t = Math.max(1, Math.round(Math.min(width, height) / 400)); // outline width, as the PNG's
      for (let y = 0, i = 0; y < height; y += 1) {
        for (let x = 0; x < width; x += 1, i += 1) {
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
      ctx.putImageData(image, 0, 0);
    }
    const line = Math.max(1, Math.round(Math.min(width, height) / 400));
    answer.instances.forEach((instance, i) => {
      if (!(el.boxes.checked || i === hovered || !instance.segmentation)) return;
      const [x, y, w, h] = instance.bbox;
      const [r, g, b] = state.colours[i];
      ctx.lineWidth = i === hovered ? 2 * line : line;
      ctx.strokeStyle = i === hovered ? "#fff" : `rgb(${r} ${g} ${b})`;
      ctx.strokeRect(x, y, w, h);
    });
  }

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
    state.hovered = index;
    for (const row of el.table.tBodies[0].rows) row.classList.toggle("hovered", Number(row.dataset.index) === index);
    el.table.tBodies[0].querySelector("tr.hovered")?.scrollIntoView({ block: "nearest" });
    draw();
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

  el.canvas.addEventListener("mousemove", (event) => {
    if (!state.labels) return;
    const rect = el.canvas.getBoundingClientRect();
    const x = Math.floor(((event.clientX - rect.left) * el.canvas.width) / rect.width);
    const y = Math.floor(((event.clientY - rect.top) * el.canvas.height) / rect.height);
    const inside = x >= 0 && y >= 0 && x < el.canvas.width && y < el.canvas.height;
    hover(inside ? state.labels[y * el.canvas.width + x] - 1 : -1);
  });
  el.canvas.addEventListener("mouseleave", () => hover(-1));

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
    draw(-1); // the overlay as drawn, without the hover highlight
    el.canvas.toBlob((blob) => {
      save(blob, `${stem()}.overlay.png`);
      draw();
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
    segmentSoon();
  });
  el.scale.addEventListener("change", segmentSoon);
  for (const toggle of [el.fill, el.outline, el.boxes]) toggle.addEventListener("change", () => draw());

  el.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) ?? "";
  el.apiKey.addEventListener("change", () => {
    const key = el.apiKey.value.trim();
    if (key) sessionStorage.setItem(API_KEY_STORAGE, key);
    else sessionStorage.removeItem(API_KEY_STORAGE);
    clearError();
    loadModels().then(segmentSoon);
  });

  loadModels();
}

if (typeof document !== "undefined") {
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", startPage);
  else startPage();
}
