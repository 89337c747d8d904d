/* diffspeed page: talks to the server's web-UI-compatible API (/sdapi/v1/...) and diffspeed's own (/diffspeed/v1/...).
   Plain JavaScript, no build step, no network access beyond the page's own server. */
(function () {
  "use strict";

  const POLL_MS = 500;
  const FALLBACK_SIZE = 512;
  const FALLBACK_CFG = 7;
  const DEFAULT_SAMPLER = "DPM++ 2M";

  // request body field (first part of a 422 `loc` after "body") -> the form control that sets it
  const FIELD_CONTROLS = {
    prompt: "prompt", negative_prompt: "negative_prompt", sampler_name: "sampler", sampler: "sampler",
    steps: "steps", width: "width", height: "height", seed: "seed", cfg_scale: "cfg_scale",
    override_settings: "model", sd_model_checkpoint: "model", preset: "preset", recipe: "recipe",
  };

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, statusText, body, retryAfter) {
      super(`HTTP ${status} ${statusText}`);
      this.status = status;
      this.statusText = statusText;
      this.body = body;
      this.retryAfter = retryAfter;
    }
  }

  /* One fetch helper: same-origin credentials (the browser answers HTTP Basic auth itself), JSON both ways,
     a non-2xx answer becomes an ApiError carrying the parsed body (or its text when it is not JSON). */
  async function api(path, { method = "GET", body, signal } = {}) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" }, signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let data = text;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      // not JSON (a proxy's HTML page, a plain-text 500): keep the text for the error area
    }
    if (!response.ok) {
      throw new ApiError(response.status, response.statusText, data, response.headers.get("Retry-After"));
    }
    return data;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  /* ---------- errors ---------- */

  function locToField(loc) {
    if (!Array.isArray(loc)) return loc === undefined || loc === null ? "" : String(loc);
    const parts = loc[0] === "body" || loc[0] === "query" ? loc.slice(1) : loc;
    let out = "";
    for (const part of parts) {
      if (typeof part === "number") out += `[${part}]`;
      else out += (out ? "." : "") + part;
    }
    return out || loc.join(".");
  }

  function controlFor(loc) {
    const parts = Array.isArray(loc) ? loc.filter((p) => typeof p === "string" && p !== "body") : [String(loc)];
    // the deepest name that is a form control: override_settings.sd_model_checkpoint -> model, args[0].recipe -> recipe
    for (let i = parts.length - 1; i >= 0; i--) {
      if (FIELD_CONTROLS[parts[i]]) return $(FIELD_CONTROLS[parts[i]]);
    }
    return null;
  }

  function stringify(value) {
    if (typeof value === "string") return value;
    try {
      return JSON.stringify(value);
    } catch (_) {
      return String(value);
    }
  }

  function clearError() {
    const box = $("error");
    box.hidden = true;
    box.replaceChildren();
    for (const node of document.querySelectorAll("[aria-invalid='true']")) node.removeAttribute("aria-invalid");
  }

  /* Show `err` (an ApiError, a network failure, anything thrown) readably: FastAPI's 422 list as one line per
     field, {detail: "text"} as text, 429's Retry-After and 401 explained, anything else as status and body. */
  function showError(err, context, { append = false } = {}) {
    const box = $("error");
    const title = context ? `${context} failed` : "Request failed";
    const parts = [];
    if (err instanceof ApiError) {
      const body = err.body;
      const detail = body && typeof body === "object" ? body.detail ?? body.error ?? body.errors : body;
      let heading = `${title}: HTTP ${err.status}${err.statusText ? " " + err.statusText : ""}`;
      if (err.status === 422) heading = `${title}: the server refused these values`;
      if (err.status === 429) heading = `${title}: the server's queue is full`;
      if (err.status === 401) heading = `${title}: authentication required`;
      parts.push(el("h3", {}, heading));
      if (Array.isArray(detail)) {
        const list = el("ul");
        for (const item of detail) {
          if (item && typeof item === "object" && ("msg" in item || "loc" in item)) {
            const field = locToField(item.loc);
            list.append(el("li", {}, field ? el("code", {}, field) : null, field ? ": " : "", item.msg ?? stringify(item)));
            const control = controlFor(item.loc);
            if (control) control.setAttribute("aria-invalid", "true");
          } else {
            list.append(el("li", {}, stringify(item)));
          }
        }
        parts.push(list);
      } else if (detail !== null && detail !== undefined && detail !== "") {
        const text = stringify(detail);
        parts.push(el("p", {}, text.length > 2000 ? text.slice(0, 2000) + "\u2026" : text));
      }
      if (err.status === 429) {
        const wait = err.retryAfter ? `Try again in ${err.retryAfter} s.` : "Try again shortly.";
        parts.push(el("p", {}, wait));
      }
      if (err.status === 401) {
        parts.push(el("p", {}, "The server needs a user name and password (HTTP Basic). Reload the page to sign in."));
      }
    } else if (err && err.name === "AbortError") {
      parts.push(el("h3", {}, `${title}: cancelled`));
    } else {
      parts.push(el("h3", {}, `${title}: the server could not be reached`));
      parts.push(el("p", {}, String((err && err.message) || err)));
    }
    if (append && !box.hidden) box.append(...parts);
    else box.replaceChildren(...parts);
    box.hidden = false;
    box.scrollIntoView({ block: "nearest" });
  }

  /* ---------- choices (models, samplers, presets) ---------- */

  const state = {
    models: [],          // GET /sdapi/v1/sd-models
    currentModel: null,  // the sd-models item the server has loaded (options.sd_model_checkpoint)
    edited: new Set(),   // ids of size/CFG inputs the user changed: a model switch leaves those alone
    running: false,
    pollTimer: null,
    startedAt: 0,
    lastSeed: null,
  };

  function modelMatches(item, name) {
    if (!item || !name) return false;
    return item.title === name || item.model_name === name || (item.title || "").split(" [")[0] === name;
  }

  function nativeSize(item) {
    const size = item && item.diffspeed ? item.diffspeed.native_size : undefined;
    if (typeof size === "number" && size > 0) return [size, size];
    if (Array.isArray(size) && size.length === 2) return [Number(size[0]), Number(size[1])];
    if (size && typeof size === "object" && size.width && size.height) return [size.width, size.height];
    return [FALLBACK_SIZE, FALLBACK_SIZE];
  }

  function recommendedCfg(item) {
    const cfg = item && item.diffspeed ? item.diffspeed.recommended_cfg : undefined;
    return typeof cfg === "number" ? cfg : FALLBACK_CFG;
  }

  function selectedModel() {
    const title = $("model").value;
    return state.models.find((m) => m.title === title) || null;
  }

  function applyModelDefaults() {
    const item = selectedModel();
    if (!item) return;
    const [w, h] = nativeSize(item);
    if (!state.edited.has("width")) $("width").value = w;
    if (!state.edited.has("height")) $("height").value = h;
    if (!state.edited.has("cfg_scale")) $("cfg_scale").value = recommendedCfg(item);
  }

  function fillModels(models, current) {
    const select = $("model");
    state.models = Array.isArray(models) ? models : [];
    state.currentModel = state.models.find((m) => modelMatches(m, current)) || null;
    select.replaceChildren();
    for (const item of state.models) {
      const label = item === state.currentModel ? `${item.title} (loaded)` : item.title;
      select.append(el("option", { value: item.title }, label));
    }
    if (state.currentModel) select.value = state.currentModel.title;
    select.disabled = state.models.length === 0;
    if (state.models.length === 0) select.append(el("option", { value: "" }, "no models"));
    applyModelDefaults();
  }

  function fillSamplers(samplers) {
    const select = $("sampler");
    const names = (Array.isArray(samplers) ? samplers : []).map((s) => (typeof s === "string" ? s : s.name));
    select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
    if (names.includes(DEFAULT_SAMPLER)) select.value = DEFAULT_SAMPLER;
    select.disabled = names.length === 0;
    if (names.length === 0) select.append(el("option", { value: "" }, "server default"));
  }

  function fillPresets(presets) {
    const select = $("preset");
    select.replaceChildren(el("option", { value: "" }, "none (server default)"));
    for (const preset of Array.isArray(presets) ? presets : []) {
      const option = el("option", { value: preset.name }, preset.name);
      if (preset.description) option.title = preset.description;
      option.dataset.description = preset.description || "";
      select.append(option);
    }
    showPresetHint();
  }

  function showPresetHint() {
    const option = $("preset").selectedOptions[0];
    $("preset-hint").textContent = option && option.dataset.description ? option.dataset.description : "";
  }

  async function loadChoices() {
    const [models, options, samplers, presets] = await Promise.allSettled([
      api("/sdapi/v1/sd-models"),
      api("/sdapi/v1/options"),
      api("/sdapi/v1/samplers"),
      api("/diffspeed/v1/presets"),
    ]);
    const current = options.status === "fulfilled" && options.value ? options.value.sd_model_checkpoint : null;
    fillModels(models.status === "fulfilled" ? models.value : [], current);
    fillSamplers(samplers.status === "fulfilled" ? samplers.value : []);
    fillPresets(presets.status === "fulfilled" ? presets.value : []);

    const failed = [
      ["Loading models", models], ["Loading options", options],
      ["Loading samplers", samplers], ["Loading presets", presets],
    ].filter(([, result]) => result.status === "rejected");
    for (const [what, result] of failed) showError(result.reason, what, { append: true });
    $("load-status").textContent = failed.length
      ? "Some choices could not be loaded."
      : `Ready${state.currentModel ? ": " + state.currentModel.model_name + " loaded" : ""}.`;
    document.body.dataset.ready = "true";
    $("generate").disabled = false;
  }

  /* ---------- request ---------- */

  function numberField(id) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;  // empty: let the server choose
    const value = Number(raw);
    return Number.isFinite(value) ? value : raw;  // the server's 422 names a value that is not a number
  }

  function buildPayload() {
    const payload = {
      prompt: $("prompt").value,
      negative_prompt: $("negative_prompt").value,
    };
    for (const id of ["steps", "width", "height", "seed", "cfg_scale"]) {
      const value = numberField(id);
      if (value !== undefined) payload[id] = value;
    }
    if ($("sampler").value) payload.sampler_name = $("sampler").value;

    const model = selectedModel();
    if (model && model !== state.currentModel) {
      payload.override_settings = { sd_model_checkpoint: model.title };
    }

    // the preset and the recipe go to the server as given; which wins (or that both is an error) is its rule
    const script = {};
    if ($("preset").value) script.preset = $("preset").value;
    if ($("recipe").value.trim()) script.recipe = $("recipe").value;
    if (Object.keys(script).length) payload.alwayson_scripts = { diffspeed: { args: [script] } };
    return payload;
  }

  /* ---------- progress ---------- */

  function formatSeconds(value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "\u2013";
    return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
  }

  function showProgress(data) {
    if (!state.running || !data) return;
    const progress = Math.min(1, Math.max(0, Number(data.progress) || 0));
    const job = data.state || {};
    const depth = data.queue && typeof data.queue.depth === "number" ? data.queue.depth : null;
    $("progress").value = progress;
    const bits = [];
    if (job.sampling_steps) bits.push(`step ${job.sampling_step || 0}/${job.sampling_steps}`);
    bits.push(`${Math.round(progress * 100)} %`);
    if (progress > 0 && typeof data.eta_relative === "number" && data.eta_relative > 0) {
      bits.push(`ETA ${formatSeconds(data.eta_relative)}`);
    }
    if (depth) bits.push(`${depth} waiting in queue`);
    if (progress === 0 && !job.sampling_steps && depth) bits.unshift("queued");
    bits.push(`elapsed ${formatSeconds((performance.now() - state.startedAt) / 1000)}`);
    $("progress-text").textContent = bits.join(" \u00b7 ");
  }

  function schedulePoll() {
    state.pollTimer = setTimeout(async () => {
      if (!state.running) return;
      try {
        showProgress(await api("/sdapi/v1/progress?skip_current_image=true"));
      } catch (_) {
        // a missed poll is not an error of the generation; the next one may answer
      }
      if (state.running) schedulePoll();
    }, POLL_MS);
  }

  function setRunning(running) {
    state.running = running;
    $("generate").disabled = running;
    $("generate").textContent = running ? "Generating\u2026" : "Generate";
    $("interrupt").disabled = !running;
    $("interrupt").textContent = "Interrupt";
    document.body.dataset.running = running ? "true" : "false";
    if (running) {
      state.startedAt = performance.now();
      $("progress").value = 0;
      $("progress").removeAttribute("value");  // indeterminate until the first poll answers
      $("progress-text").textContent = "Sending\u2026";
      $("progress-box").hidden = false;
      schedulePoll();
    } else {
      clearTimeout(state.pollTimer);
      state.pollTimer = null;
      $("progress-box").hidden = true;
    }
  }

  /* ---------- result ---------- */

  function parseInfo(info) {
    if (info && typeof info === "object") return info;
    try {
      return info ? JSON.parse(info) : {};
    } catch (_) {
      return {};
    }
  }

  function addTiming(list, label, value) {
    if (value === undefined || value === null || value === "") return;
    list.append(el("dt", {}, label), el("dd", {}, value));
  }

  function showResult(response, roundTrip) {
    const images = (response && response.images) || [];
    const info = parseInfo(response && response.info);
    const first = images[0];
    const img = $("result-image");
    if (first) {
      const src = first.startsWith("data:") ? first : `data:image/png;base64,${first}`;
      img.src = src;
      img.hidden = false;
      $("image-placeholder").hidden = true;
      $("download").href = src;
      const seed = Array.isArray(info.all_seeds) ? info.all_seeds[0] : info.seed;
      $("download").download = `diffspeed-${seed ?? "image"}.png`;
      state.lastSeed = typeof seed === "number" ? seed : null;
      $("reuse-seed").hidden = state.lastSeed === null;
      $("result-actions").hidden = false;
    } else {
      img.hidden = true;
      img.removeAttribute("src");
      $("image-placeholder").hidden = false;
      $("image-placeholder").textContent = "The server answered without an image (interrupted?).";
      $("result-actions").hidden = true;
    }

    const infotexts = Array.isArray(info.infotexts) ? info.infotexts : [];
    $("parameters").textContent = infotexts[0] || "";

    const ds = info.diffspeed || {};
    const timing = $("timing");
    timing.replaceChildren();
    addTiming(timing, "Time", formatSeconds(ds.seconds));
    if (typeof ds.seconds_per_image === "number") addTiming(timing, "Per image", formatSeconds(ds.seconds_per_image));
    if (typeof ds.steps_per_second === "number") addTiming(timing, "Speed", `${ds.steps_per_second.toFixed(2)} steps/s`);
    addTiming(timing, "Preset", ds.preset || "none");
    if (Array.isArray(ds.batched_with)) {
      addTiming(timing, "Batched with", ds.batched_with.length ? ds.batched_with.map(stringify).join(", ") : "none");
    } else if (ds.batched_with !== undefined && ds.batched_with !== null) {
      addTiming(timing, "Batched with", stringify(ds.batched_with));
    }
    addTiming(timing, "Round trip", formatSeconds(roundTrip));

    const stats = ds.stats && typeof ds.stats === "object" ? Object.entries(ds.stats) : [];
    $("stats").tBodies[0].replaceChildren(
      ...stats.map(([key, value]) => el("tr", {}, el("th", { scope: "row" }, key), el("td", {}, stringify(value)))),
    );
    $("stats-details").hidden = stats.length === 0;

    const events = Array.isArray(ds.events) ? ds.events : [];
    $("events").replaceChildren(...events.map((event) => el("li", {}, stringify(event))));
    $("events-details").hidden = events.length === 0;

    // one column (narrow screens): the result is below the form, bring it into view
    if (window.matchMedia("(max-width: 820px)").matches) $("result-title").scrollIntoView({ block: "start" });
  }

  /* ---------- actions ---------- */

  async function generate(event) {
    if (event) event.preventDefault();
    if (state.running) return;
    clearError();
    setRunning(true);
    const started = performance.now();
    try {
      const response = await api("/sdapi/v1/txt2img", { method: "POST", body: buildPayload() });
      showResult(response, (performance.now() - started) / 1000);
    } catch (err) {
      showError(err, "Generation");
    } finally {
      setRunning(false);
    }
  }

  async function interrupt() {
    $("interrupt").disabled = true;
    $("interrupt").textContent = "Interrupting\u2026";
    try {
      await api("/sdapi/v1/interrupt", { method: "POST" });
    } catch (err) {
      showError(err, "Interrupt");
      if (state.running) $("interrupt").disabled = false;
    }
  }

  function init() {
    $("generate-form").addEventListener("submit", generate);
    $("interrupt").addEventListener("click", interrupt);
    $("model").addEventListener("change", applyModelDefaults);
    $("preset").addEventListener("change", showPresetHint);
    $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
    $("reuse-seed").addEventListener("click", () => {
      if (state.lastSeed !== null) $("seed").value = state.lastSeed;
    });
    for (const id of ["width", "height", "cfg_scale"]) {
      $(id).addEventListener("input", () => state.edited.add(id));
    }
    for (const id of ["prompt", "negative_prompt", "recipe"]) {
      $(id).addEventListener("keydown", (event) => {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate(event);
      });
    }
    for (const node of document.querySelectorAll("input, select, textarea")) {
      node.addEventListener("input", () => node.removeAttribute("aria-invalid"));
    }
    loadChoices().catch((err) => {
      showError(err, "Loading the page");
      $("generate").disabled = false;
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
