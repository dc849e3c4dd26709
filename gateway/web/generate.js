// The generation page: a form over POST /v1/jobs, following the job's server-sent events.
//
// Models and their LoRAs come from /v1/models, samplers from the providers of the chosen
// model (/v1/providers). A 400's message starts with the field at fault ("width: ..."): it
// is shown next to that field; other errors in one line. Settings are kept in localStorage.

import { api, el, normalize, postJson, seconds, shortPeer } from "/static/common.js";

const STORE = "sdcn.generate";
// Jobs whose images stay on the page (the oldest go first).
const MAX_JOBS = 8;
// How often the models and providers are read again while the page is open (ms).
const CATALOG_EVERY = 30000;
const NUMBERS = ["width", "height", "steps", "cfg_scale", "seed", "batch_size", "denoising_strength"];
const TEXTS = ["prompt", "negative_prompt"];

const $ = (id) => document.getElementById(id);
const form = $("job");

let catalog = { models: [], providers: [], key: "" };
let saved = loadSettings();
let initImage = null; // the init image as a data: URL
let current = null; // the job being followed

// --- settings --------------------------------------------------------------------------------

function loadSettings() {
  try {
    const value = JSON.parse(localStorage.getItem(STORE));
    return value && typeof value === "object" ? value : {};
  } catch {
    return {};
  }
}

function settings() {
  const values = { loras: loraSettings() };
  for (const id of [...TEXTS, ...NUMBERS]) values[id] = $(id).value;
  values.model = $("model").value || saved.model;
  values.sampler_name = $("sampler_name").value || saved.sampler_name;
  values.seed_random = $("seed_random").checked;
  values.kind = kind();
  return values;
}

function saveSettings() {
  saved = settings();
  try {
    localStorage.setItem(STORE, JSON.stringify(saved));
  } catch {
    // private mode or full: the page works without
  }
}

function restoreSettings() {
  for (const id of [...TEXTS, ...NUMBERS]) {
    if (typeof saved[id] === "string") $(id).value = saved[id];
  }
  if (typeof saved.seed_random === "boolean") $("seed_random").checked = saved.seed_random;
  if (saved.kind === "img2img") $("kind-img2img").checked = true;
  showMode();
}

/** The LoRAs' checkboxes and weights, over those of models not shown now. */
function loraSettings() {
  const loras = { ...(saved.loras || {}) };
  for (const box of $("loras").querySelectorAll("input[data-lora]")) {
    const weight = box.closest("li").querySelector("input[type=number]");
    loras[box.dataset.lora] = { on: box.checked, weight: weight.value };
  }
  return loras;
}

// --- the catalog: models, LoRAs, samplers ----------------------------------------------------

async function loadCatalog() {
  const [models, providers] = await Promise.all([api("/v1/models"), api("/v1/providers")]);
  const key = JSON.stringify([models, providers.map((p) => [p.peer_id, p.state, p.models, p.samplers])]);
  if (key === catalog.key) return;
  catalog = { models, providers, key };
  fillModels();
}

function fillModels() {
  const select = $("model");
  const wanted = normalize(select.value || saved.model || "");
  const options = catalog.models.map((model) =>
    el("option", { value: model.name }, `${model.name} (${plural(model.providers, "provider")})`),
  );
  if (!options.length) options.push(el("option", { value: "" }, "No model online"));
  select.replaceChildren(...options);
  // The model chosen before, else the one most providers offer.
  const match =
    catalog.models.find((model) => normalize(model.name) === wanted) ??
    catalog.models.reduce((best, model) => (best && best.providers >= model.providers ? best : model), null);
  if (match) select.value = match.name;
  fillLoras();
  fillSamplers();
}

function fillLoras() {
  const loras = loraSettings();
  const model = catalog.models.find((m) => m.name === $("model").value);
  const names = model ? model.loras : [];
  $("loras").replaceChildren(
    ...names.map((name, index) => {
      const held = loras[name] || { on: false, weight: "1" };
      return el(
        "li",
        {},
        el("input", { type: "checkbox", id: `lora-${index}`, checked: held.on, "data-lora": name }),
        el("label", { htmlFor: `lora-${index}` }, name),
        el("label", { htmlFor: `lora-weight-${index}`, className: "weight" }, "weight",
          el("span", { className: "vh" }, ` of ${name}`)),
        el("input", {
          type: "number", id: `lora-weight-${index}`, min: "-5", max: "5", step: "0.05",
          value: held.weight, inputMode: "decimal",
        }),
      );
    }),
  );
  $("loras-none").hidden = names.length > 0;
}

function fillSamplers() {
  const select = $("sampler_name");
  const model = normalize($("model").value);
  const offered = new Map(); // normalized -> as the first provider spells it
  for (const provider of catalog.providers) {
    if (provider.state !== "online" || !provider.models.some((m) => normalize(m.name) === model)) {
      continue;
    }
    for (const sampler of provider.samplers) {
      if (!offered.has(normalize(sampler))) offered.set(normalize(sampler), sampler);
    }
  }
  const wanted = normalize(select.value || saved.sampler_name || "Euler a");
  select.replaceChildren(...[...offered.values()].map((name) => el("option", { value: name }, name)));
  const match = offered.get(wanted) ?? offered.get("euler a");
  if (match) select.value = match;
}

// --- the form ----------------------------------------------------------------------------------

function kind() {
  return $("kind-img2img").checked ? "img2img" : "txt2img";
}

function showMode() {
  $("img2img").hidden = kind() !== "img2img";
  $("seed").disabled = $("seed_random").checked;
}

/** A number input's value as a number, or as typed if it is none (the gateway says why). */
function number(id) {
  const text = $(id).value.trim();
  const value = Number(text);
  return text !== "" && Number.isFinite(value) ? value : text || null;
}

function jobRequest() {
  const body = { kind: kind(), model: $("model").value, sampler_name: $("sampler_name").value };
  for (const id of TEXTS) body[id] = $(id).value;
  for (const id of ["width", "height", "steps", "cfg_scale", "batch_size"]) body[id] = number(id);
  body.seed = $("seed_random").checked ? -1 : number("seed");
  body.loras = [];
  for (const box of $("loras").querySelectorAll("input[data-lora]:checked")) {
    const weight = box.closest("li").querySelector("input[type=number]");
    body.loras.push([box.dataset.lora, number(weight.id)]);
  }
  if (body.kind === "img2img") {
    body.denoising_strength = number("denoising_strength");
    if (initImage) body.init_image = initImage;
  }
  return body;
}

function clearErrors() {
  for (const slot of form.querySelectorAll(".error")) slot.textContent = "";
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  $("error").textContent = "";
}

function showError(message) {
  $("error").textContent = message;
}

/** Show a 400's message next to the field it names ("width: must be ..."), else in the line. */
function showFieldError(message) {
  const field = /^([a-z_]+)/.exec(message)?.[1];
  const slot = field ? $(`${field}-error`) : null;
  if (!slot) {
    showError(message);
    return;
  }
  slot.textContent = message;
  const control = field === "loras" ? $("loras").querySelector("input") : $(field);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.focus();
  }
}

async function useFile(file) {
  $("init_image-error").textContent = "";
  if (!file) {
    initImage = null;
    $("init_image-about").textContent = "Choose a PNG, JPEG or WebP file, or drop one here.";
    $("init_clear").hidden = true;
    return;
  }
  initImage = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  let size = "";
  try {
    const bitmap = await createImageBitmap(file);
    size = `${bitmap.width}×${bitmap.height}, `;
    bitmap.close();
  } catch {
    // not an image the browser reads: the gateway will say so
  }
  $("init_image-about").textContent = `${file.name}: ${size}${Math.ceil(file.size / 1024)} KB`;
  $("init_clear").hidden = false;
}

function chooseFile(file) {
  const files = new DataTransfer();
  files.items.add(file);
  $("init_image").files = files.files;
  $("kind-img2img").checked = true;
  showMode();
  saveSettings();
  return useFile(file);
}

// --- running a job -----------------------------------------------------------------------------

function status(text) {
  $("status").textContent = text;
}

function progress(step, total) {
  const bar = $("progress");
  bar.hidden = false;
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(step));
  bar.setAttribute("aria-valuetext", `step ${step} of ${total}`);
  // Through the CSSOM, which a Content-Security-Policy without 'unsafe-inline' allows.
  $("progress-fill").style.width = `${total > 0 ? (100 * step) / total : 0}%`;
}

function eta(value) {
  return value ? `, about ${seconds(value)} left` : "";
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function setRunning(job) {
  current = job;
  $("generate").disabled = job !== null;
  $("cancel").hidden = job === null || !job.id;
}

async function generate() {
  if (current) return;
  clearErrors();
  saveSettings();
  const body = jobRequest();
  const job = { id: null, steps: body.steps, width: body.width, height: body.height };
  job.started = performance.now();
  setRunning(job);
  $("progress").hidden = true;
  status("Submitting…");
  try {
    const accepted = await postJson("/v1/jobs", body);
    job.id = accepted.id;
    setRunning(job);
    follow(job, accepted.urls.events);
  } catch (error) {
    setRunning(null);
    status("Not submitted.");
    if (error.status === 400) showFieldError(error.message);
    else showError(error.status ? `${error.message} (HTTP ${error.status})` : error.message);
  }
}

function follow(job, url) {
  const source = new EventSource(url);
  job.source = source;
  const on = (name, handle) =>
    source.addEventListener(name, (event) => {
      if (current === job) handle(JSON.parse(event.data));
    });
  on("queued", (data) => {
    const ahead = data.position ? `${plural(data.position, "job")} ahead` : "next in line";
    status(`Waiting for a provider: ${ahead}${eta(data.eta_s)}`);
  });
  on("assigned", (data) => {
    job.provider = data.provider;
    progress(0, job.steps);
    const again = data.attempt > 1 ? ` (attempt ${data.attempt})` : "";
    status(`Running on ${shortPeer(data.provider)}${again}`);
  });
  on("progress", (data) => {
    progress(data.step, data.total);
    status(`Step ${data.step} of ${data.total} on ${shortPeer(job.provider)}${eta(data.eta_s)}`);
  });
  on("done", (data) => {
    end(job);
    const total = Number($("progress").getAttribute("aria-valuemax")) || job.steps;
    progress(total, total);
    const took = (performance.now() - job.started) / 1000;
    status(`Done in ${seconds(took)}: ${plural(data.images.length, "image")}.`);
    show(job, data.info, data.images.length, took);
  });
  on("failed", (data) => {
    end(job);
    status("Failed.");
    showError(`${data.msg} (HTTP ${data.status})`);
  });
  on("cancelled", () => {
    end(job);
    status("Cancelled.");
  });
  source.onerror = () => {
    // The browser reconnects by itself (with Last-Event-ID) unless the gateway refused.
    if (source.readyState === EventSource.CLOSED && current === job) recover(job);
  };
}

function end(job) {
  job.source.close();
  setRunning(null);
}

async function recover(job) {
  end(job);
  try {
    const state = await api(`/v1/jobs/${encodeURIComponent(job.id)}`);
    if (state.status === "done") {
      const took = (performance.now() - job.started) / 1000;
      status(`Done in ${seconds(took)}.`);
      show(job, state.info, state.images.length, took);
    } else if (state.status === "failed") {
      showError(state.error.msg);
    } else {
      status(`Lost track of the job (${state.status}).`);
    }
  } catch (error) {
    showError(error.message);
  }
}

function show(job, info, count, took) {
  const figures = [];
  for (let index = 0; index < count; index++) {
    const seed = Array.isArray(info.seeds) ? info.seeds[index] : info.seed + index;
    const src = `/v1/jobs/${encodeURIComponent(job.id)}/images/${index}`;
    const use = el("button", { type: "button" }, "Use for img2img",
      el("span", { className: "vh" }, ` (seed ${seed})`));
    use.addEventListener("click", async () => {
      const blob = await (await fetch(src)).blob();
      await chooseFile(new File([blob], `sdcn-${seed}.png`, { type: "image/png" }));
      $("init_image").focus();
    });
    figures.push(
      el(
        "figure",
        {},
        el("img", { src, alt: "Generated image", width: job.width, height: job.height }),
        el(
          "figcaption",
          {},
          el("span", {}, `seed ${seed}`),
          " ",
          el("span", {}, info.model),
          " ",
          el("span", { title: info.provider }, `on ${shortPeer(info.provider)}`),
          " ",
          el("span", { title: `ran ${seconds(info.run_ms / 1000)} on the provider` }, seconds(took)),
          " ",
          el("span", {},
            el("a", { href: src, download: `sdcn-${seed}.png` }, "Download",
              el("span", { className: "vh" }, ` image with seed ${seed}`)),
            " ",
            use,
          ),
        ),
      ),
    );
  }
  const results = $("results");
  results.prepend(el("div", { className: "job", "data-job": job.id }, ...figures));
  while (results.children.length > MAX_JOBS) results.lastElementChild.remove();
}

// --- wiring ------------------------------------------------------------------------------------

form.addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("generate").disabled) {
    event.preventDefault();
    form.requestSubmit($("generate"));
  }
});
$("cancel").addEventListener("click", async () => {
  const job = current;
  if (!job || !job.id) return;
  $("cancel").disabled = true;
  status("Cancelling…");
  try {
    // The answer comes once the job has ended: often after its "cancelled" event.
    const state = await api(`/v1/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
    if (current === job && state.status === "cancelled") {
      end(job);
      status("Cancelled.");
    }
  } catch (error) {
    showError(error.message);
  } finally {
    $("cancel").disabled = false;
  }
});
$("model").addEventListener("change", () => {
  fillLoras();
  fillSamplers();
});
form.addEventListener("change", (event) => {
  if (event.target.name === "kind" || event.target.id === "seed_random") showMode();
  saveSettings();
});
form.addEventListener("input", saveSettings);
$("init_image").addEventListener("change", () => useFile($("init_image").files[0]));
$("init_clear").addEventListener("click", () => {
  $("init_image").value = "";
  useFile(null);
});
document.addEventListener("dragover", (event) => {
  if (event.dataTransfer && [...event.dataTransfer.types].includes("Files")) {
    event.preventDefault(); // else the browser opens the file
    $("drop").classList.add("over");
  }
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) $("drop").classList.remove("over");
});
document.addEventListener("drop", (event) => {
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (!file) return;
  event.preventDefault();
  $("drop").classList.remove("over");
  chooseFile(file);
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) loadCatalog().catch(() => {});
});
setInterval(() => {
  if (!document.hidden) loadCatalog().catch(() => {});
}, CATALOG_EVERY);

restoreSettings();
loadCatalog()
  .catch((error) => showError(`Cannot list the network's models: ${error.message}`))
  .finally(() => {
    $("generate").disabled = current !== null;
    performance.mark("sdcn:ready");
    document.documentElement.dataset.ready = "true";
  });
