// kedavra's page: a form over /sdapi/v1/txt2img and /img2img, live progress from /sdapi/v1/progress, and a gallery
// of this session's images kept in sessionStorage. Plain browser JavaScript, no build step, no outside requests.
"use strict";

const API = "sdapi/v1";
const POLL_MS = 500; // how often the page asks for progress while a request runs
const GALLERY_KEY = "kedavra.gallery";
const KEY_KEY = "kedavra.apiKey";
const NUMBER_FIELDS = ["steps", "cfg_scale", "seed", "width", "height", "batch_size", "denoising_strength"];

const $ = (id) => document.getElementById(id);
let initImage = null; // data: URL of the chosen image-to-image input
let gallery = loadGallery();

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function api(path, options = {}) {
  const response = await fetch(`${API}/${path}`, { ...options, headers: headers() });
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) throw new Error(describeError(response, body));
  return body;
}

function describeError(response, body) {
  const detail = body && body.detail;
  let text = `${response.status} ${response.statusText}`;
  if (Array.isArray(detail)) {
    text += ": " + detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".") || "request"}: ${d.msg}`)
      .join("\n");
  } else if (detail) {
    text += `: ${detail}`;
  }
  const retry = response.headers.get("Retry-After");
  if (retry) text += ` (retry in ${retry} s)`;
  return text;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function fillSelect(select, items, chosen) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === chosen)));
}

async function loadServerLists() {
  try {
    const [samplers, schedulers, options, latentModes, upscalers] = await Promise.all([
      api("samplers"), api("schedulers"), api("options"), api("latent-upscale-modes"), api("upscalers")]);
    fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "Euler a");
    fillSelect($("hr_upscaler"), [...latentModes, ...upscalers].map((u) => [u.name, u.name]), "Latent");
    fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
    $("model").textContent = options.sd_model_checkpoint;
  } catch (error) {
    $("model").textContent = "not connected";
    setStatus(String(error.message || error), true);
  }
}

function payload() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
  };
  for (const name of NUMBER_FIELDS) {
    const text = $(name).value.trim();
    if (text !== "" && (name !== "denoising_strength" || initImage)) body[name] = Number(text);
  }
  if (initImage) body.init_images = [initImage];
  if (!initImage && $("enable_hr").checked) { // A1111's hires fix: its fields, its one denoising_strength
    body.enable_hr = true;
    body.hr_upscaler = $("hr_upscaler").value;
    for (const name of ["hr_scale", "hr_second_pass_steps"]) body[name] = Number($(name).value);
    body.denoising_strength = Number($("hr_denoising_strength").value);
  }
  return body;
}

async function pollProgress(state) {
  while (state.running) {
    try {
      const progress = await api("progress");
      if (!state.running) break;
      $("progress").value = progress.progress;
      const queued = progress.state.queued ? `, ${progress.state.queued} waiting` : "";
      setStatus(`${progress.textinfo || "Queued"}${queued}`);
      if (progress.current_image) {
        $("preview").src = `data:image/png;base64,${progress.current_image}`;
        $("preview").hidden = false;
      }
    } catch (error) {
      // a missed poll is not fatal: the generation request reports its own errors
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function generate(event) {
  event.preventDefault();
  const state = { running: true };
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  $("progress").hidden = false;
  setStatus("Queued");
  const polling = pollProgress(state);
  try {
    const endpoint = initImage ? "img2img" : "txt2img";
    const result = await api(endpoint, { method: "POST", body: JSON.stringify(payload()) });
    const info = JSON.parse(result.info);
    showResult(result.images, info.infotexts);
    for (let i = result.images.length - 1; i >= 0; i--) {
      gallery.unshift({ image: result.images[i], infotext: info.infotexts[i] });
    }
    saveGallery();
    renderGallery();
    const made = `${result.images.length} image${result.images.length === 1 ? "" : "s"}`;
    setStatus(info.interrupted ? `Interrupted: ${made} finished.` : `Done: ${made}, seed ${info.seed}.`);
  } catch (error) {
    setStatus(String(error.message || error), true);
  } finally {
    state.running = false;
    await polling;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("progress").hidden = true;
    $("preview").hidden = true;
  }
}

function figure(image, infotext) {
  const src = `data:image/png;base64,${image}`;
  const img = document.createElement("img");
  img.src = src;
  img.alt = infotext.split("\n")[0];
  const text = document.createElement("pre");
  text.className = "parameters";
  text.textContent = infotext;
  const link = document.createElement("a");
  link.href = src;
  link.download = `kedavra-${(infotext.match(/Seed: (\d+)/) || [null, "image"])[1]}.png`;
  link.textContent = "Download PNG";
  const result = document.createElement("figure");
  result.append(img, text, link);
  return result;
}

function showResult(images, infotexts) {
  $("result").replaceChildren(...images.map((image, i) => figure(image, infotexts[i])));
}

function loadGallery() {
  try {
    return JSON.parse(sessionStorage.getItem(GALLERY_KEY)) || [];
  } catch (error) {
    return [];
  }
}

function saveGallery() {
  // sessionStorage holds a few MB: the oldest images leave the stored copy first (the page keeps them all).
  for (let kept = gallery.length; kept > 0; kept--) {
    try {
      sessionStorage.setItem(GALLERY_KEY, JSON.stringify(gallery.slice(0, kept)));
      return;
    } catch (error) {
      // over the quota: try with one image fewer
    }
  }
}

function renderGallery() {
  $("gallery").replaceChildren(...gallery.map((item) => {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${item.image}`;
    img.title = item.infotext;
    img.alt = item.infotext.split("\n")[0];
    img.addEventListener("click", () => showResult([item.image], [item.infotext]));
    return img;
  }));
}

function chooseInitImage() {
  const file = $("init_image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    initImage = reader.result;
    $("init_preview").src = initImage;
    $("init_preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

function clearInitImage() {
  initImage = null;
  $("init_image").value = "";
  $("init_preview").hidden = true;
}

$("api_key").value = sessionStorage.getItem(KEY_KEY) || "";
$("api_key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_KEY, $("api_key").value.trim());
  loadServerLists();
});
$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("interrupt", { method: "POST" }).catch(() => {}));
$("init_image").addEventListener("change", chooseInitImage);
$("clear_init").addEventListener("click", clearInitImage);
renderGallery();
loadServerLists();
