// The network page: totals (/v1/status), providers (/v1/providers) and models (/v1/models),
// read again every few seconds (?refresh=SECONDS, 0.5 to 60; default 3) while the page shows.

import { api, el, seconds, shortPeer } from "/static/common.js";

const $ = (id) => document.getElementById(id);
const TOTALS = [
  "providers_online", "models_online", "jobs_waiting", "jobs_running", "images_last_minute",
  "clients_active",
];
const STATES = { online: 0, draining: 1, unavailable: 2 };
const asked = Number(new URLSearchParams(location.search).get("refresh"));
const EVERY = Math.min(Math.max(Number.isFinite(asked) && asked > 0 ? asked : 3, 0.5), 60);

let timer = null;
let updates = 0;

function cell(content, className) {
  return el("td", { className }, content);
}

function muted(text) {
  return el("span", { className: "muted" }, text);
}

function providerRow(provider, now) {
  const speed = provider.observed_speed !== null
    ? el("span", { title: `measured by this gateway; ${provider.speed.toFixed(1)} advertised` },
        provider.observed_speed.toFixed(1))
    : el("span", { title: "advertised; not measured yet" }, provider.speed.toFixed(1), muted(" adv."));
  let trust;
  const excluded = provider.excluded_until !== null;
  if (excluded) {  // caught drawing wrong pictures: the reason as its tooltip
    const left = seconds(Math.max(provider.excluded_until - now, 0));
    trust = el("span", { title: provider.excluded_reason }, `excluded for ${left}`);
  } else if (provider.banned_until !== null) {
    trust = `banned for ${seconds(Math.max(provider.banned_until - now, 0))}`;
  } else {
    trust = provider.proven ? "proven" : "new";
    if (provider.strikes > 0) {
      trust += `, ${provider.strikes} strike${provider.strikes === 1 ? "" : "s"}`;
    }
  }
  const queue = provider.max_queue === null ? `${provider.queue}` : `${provider.queue} of ${provider.max_queue}`;
  const sent = el("span", {
    title: `${provider.jobs_done} completed, ${provider.in_flight} running now`,
  }, String(provider.jobs_sent));
  return el(
    "tr",
    { "data-peer": provider.peer_id, "data-state": provider.state },
    el("th", { scope: "row" },
      el("code", { title: provider.peer_id }, shortPeer(provider.peer_id)), " ", muted(provider.backend)),
    cell(provider.models.map((model) => model.name).join(", ")),
    cell(provider.state, `state ${provider.state}`),
    cell(String(provider.slots), "num"),
    cell(queue, "num"),
    cell(speed, "num"),
    cell(provider.rtt_ms === null ? "–" : `${provider.rtt_ms.toFixed(1)} ms`, "num"),
    cell(sent, "num"),
    cell(trust, excluded || provider.banned_until !== null ? "banned" : ""),
  );
}

function showProviders(providers) {
  const now = Date.now() / 1000;
  providers.sort(
    (a, b) => (STATES[a.state] ?? 9) - (STATES[b.state] ?? 9) || a.peer_id.localeCompare(b.peer_id),
  );
  const rows = providers.map((provider) => providerRow(provider, now));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 9 }, "No provider known yet.")));
  $("providers").tBodies[0].replaceChildren(...rows);
}

function showModels(models) {
  const rows = models.map((model) =>
    el("tr", { "data-model": model.name },
      el("th", { scope: "row" }, model.name),
      cell(String(model.providers), "num"),
      cell(model.loras.length ? model.loras.join(", ") : "–")),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 3 }, "No model online.")));
  $("models").tBodies[0].replaceChildren(...rows);
}

async function refresh() {
  clearTimeout(timer);
  try {
    const [status, providers, models] = await Promise.all([
      api("/v1/status"),
      api("/v1/providers"),
      api("/v1/models"),
    ]);
    for (const key of TOTALS) $(key).textContent = String(status[key]);
    // Jobs per provider slot: 1 is every slot busy, above it a line (null: no provider).
    $("load").textContent = status.load == null ? "–" : status.load.toFixed(2);
    showProviders(providers);
    showModels(models);
    $("error").textContent = "";
    $("updated").textContent = `Updated at ${new Date().toLocaleTimeString()}, every ${EVERY} s.`;
  } catch (error) {
    $("error").textContent = `Cannot read the network: ${error.message}`;
  }
  document.documentElement.dataset.updates = String(++updates);
  if (!document.hidden) timer = setTimeout(refresh, EVERY * 1000);
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refresh();
});
refresh().finally(() => performance.mark("sdcn:ready"));
