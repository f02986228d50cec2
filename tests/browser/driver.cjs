// Drives the real ComfyUI frontend in headless Debian chromium through playwright-core.
// Called by tests/browser/conftest.py:
//     node driver.cjs <plan.json>
// plan: {url, chromium, outDir, resultPath, workflows: [{name, url}], queue: [{name, api}], timeoutMs}
// Writes a JSON result to plan.resultPath; the Python tests assert on it. Every request that is not
// to the loopback server is aborted and recorded (there should be none).
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const T = plan.timeoutMs || 120000;
const result = {
  ok: false, error: null, timings: {}, frontendVersion: null, blocked: [], consoleErrors: [],
  pageErrors: [], httpErrors: [], workflows: {}, queued: {}, extensionHook: false,
};
const t0 = Date.now();
const mark = (k) => { result.timings[k] = (Date.now() - t0) / 1000; };
const save = () => fs.writeFileSync(plan.resultPath, JSON.stringify(result, null, 1));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let phase = "boot"; // which step a blocked request belongs to
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]", "::1"]);

const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--no-proxy-server",
  "--disable-default-apps", "--disable-extensions", "--metrics-recording-only", "--no-pings",
  "--disable-domain-reliability", "--disable-breakpad", "--disable-features=Translate,OptimizationHints,MediaRouter",
  // Anything but loopback fails to resolve: nothing can leave the machine even if a request slips past route().
  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
];

// PrimeVue dialogs (frontend 1.27: missing nodes / models) and the error overlay newer frontends
// show instead (1.58: "Missing node: …").
const DIALOGS = ".p-dialog, [data-testid='error-overlay']";

async function visibleDialogs(page) {
  return page.$$eval(DIALOGS, (els) =>
    els.filter((e) => e.offsetParent !== null || e.getClientRects().length > 0)
      .map((e) => (e.innerText || "").trim().slice(0, 600)));
}

async function closeDialogs(page) {
  for (let i = 0; i < 3; i++) {
    if (!(await visibleDialogs(page)).length) return;
    await page.keyboard.press("Escape");
    await sleep(150);
  }
  // Still open: click every close button.
  for (const b of await page.$$(".p-dialog .p-dialog-close-button, .p-dialog [aria-label='Close'], [data-testid='error-overlay-dismiss']")) {
    await b.click({ timeout: 1000 }).catch(() => {});
  }
}

// Zoom ≥ 0.85 (LiteGraph hides node text below ~0.6); grow the viewport so the whole graph
// (nodes and groups) shows beside the sidebar and below the menu bar.
async function frameGraph(page, scale) {
  const g = await page.evaluate(() => {
    const th = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    const add = (x, y, w, h) => { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); };
    for (const n of app.graph.nodes) add(n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th);
    for (const gr of app.graph.groups || app.graph._groups || []) {
      const b = gr._bounding || (gr.pos && gr.size ? [gr.pos[0], gr.pos[1], gr.size[0], gr.size[1]] : null);
      if (b) add(b[0], b[1], b[2], b[3]);
    }
    const rect = app.canvas.canvas.getBoundingClientRect();
    // Newer frontends (1.58) lay the side toolbar over the canvas instead of beside it.
    const bar = document.querySelector(".side-tool-bar-container");
    const barRight = bar ? bar.getBoundingClientRect().right : 0;
    return { bb: isFinite(x0) ? [x0, y0, x1, y1] : [0, 0, 800, 600], left: rect.left, top: rect.top, barRight };
  });
  const bb = g.bb, pad = 30, w = bb[2] - bb[0], h = bb[3] - bb[1];
  // The canvas lies under the top menu/tab bars (and maybe the side toolbar); keep the graph clear of them.
  const left = Math.max(pad, g.barRight - g.left + pad), top = Math.max(pad, 100 - g.top);
  const vw = Math.min(3600, Math.max(1280, Math.ceil(g.left + left + w * scale + pad)));
  const vh = Math.min(2600, Math.max(800, Math.ceil(g.top + top + h * scale + pad)));
  await page.setViewportSize({ width: vw, height: vh });
  await sleep(250);
  await page.evaluate(([bb, scale, left, top]) => {
    const ds = app.canvas.ds;
    ds.scale = scale;
    ds.offset[0] = left / scale - bb[0];
    ds.offset[1] = top / scale - bb[1];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
  }, [bb, scale, left, top]);
  await sleep(300);
  return { viewport: [vw, vh], bbox: bb, scale, canvasOrigin: [g.left, g.top] };
}

// Everything a test needs to know about the loaded graph, JSON-safe.
function graphState() {
  const prim = (v) => (v === null || ["string", "number", "boolean"].includes(typeof v) ? v : null);
  return app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, mode: n.mode, title: n.title,
    size: [n.size[0], n.size[1]],
    widgets: (n.widgets || []).map((w) => ({
      name: w.name, type: w.type, value: prim(w.value), serialize: w.serialize !== false,
      values: Array.isArray(w.options && w.options.values) ? w.options.values.map(prim) : null,
      hidden: !!(w.hidden || (w.options && w.options.hidden)),
    })),
    widgets_values: (() => { try { const s = n.serialize().widgets_values; return Array.isArray(s) ? s.map(prim) : null; } catch (e) { return null; } })(),
    registered: n.type in LiteGraph.registered_node_types,
    has_errors: !!n.has_errors,
  }));
}

// In the page: fetch a workflow and load it like the template browser does (breakIt: add an
// unknown node type and change the first DCM node's first widget — the negative control).
async function loadWorkflow({ url, name, breakIt }) {
  const resp = await fetch(url);
  if (!resp.ok) return { fetchError: `GET ${url} → HTTP ${resp.status}` };
  const data = await resp.json();
  let changed = null;
  if (breakIt) {
    for (const n of data.nodes) {
      if (n.type.startsWith("DCM") && Array.isArray(n.widgets_values) && n.widgets_values.length) {
        const v = n.widgets_values[0];
        n.widgets_values[0] = typeof v === "number" ? v + 7 : typeof v === "string" ? "dcm_no_such_value" : !v;
        changed = { id: n.id, type: n.type };
        break;
      }
    }
    const id = Math.max(0, ...data.nodes.map((n) => n.id)) + 1;
    data.nodes.push({ id, type: "DCMNoSuchNode", pos: [0, -300], size: [240, 80], flags: {}, order: data.nodes.length,
      mode: 0, inputs: [], outputs: [], properties: {}, widgets_values: [] });
    data.last_node_id = Math.max(data.last_node_id || 0, id);
  }
  window.__dcmMissing = null;
  window.__dcmToastMark = window.__dcmToasts.length;
  const types = [...new Set(data.nodes.map((n) => n.type))];
  const unregistered = types.filter((t) => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(data, true, true, breakIt ? `${name} (negative control)` : name);
  return { unregistered, savedNodes: data.nodes.length, changed };
}

// After a load: what the frontend reported and shows.
async function collect(page, r) {
  await sleep(800); // the missing-models check and its dialog are asynchronous
  r.missingHook = await page.evaluate(() => window.__dcmMissing);
  r.dialogs = await visibleDialogs(page);
  r.toasts = await page.evaluate(() => window.__dcmToasts.slice(window.__dcmToastMark)
    .map((e) => ({ cls: String(e.className), text: (e.textContent || "").trim().slice(0, 600) })));
  r.nodes = await page.evaluate(graphState);
  r.prompt = await page.evaluate(async () => {
    try { return { output: (await app.graphToPrompt()).output }; } catch (e) { return { error: String(e) }; }
  });
}

async function main() {
  const browser = await chromium.launch({ executablePath: plan.chromium, headless: true, args: FLAGS, timeout: T });
  mark("launched");
  try {
    const context = await browser.newContext({ viewport: { width: 1600, height: 1000 }, deviceScaleFactor: 1 });
    await context.route("**/*", (route) => {
      const u = new URL(route.request().url());
      if (LOOPBACK.has(u.hostname)) return route.continue();
      result.blocked.push({ phase, url: route.request().url() });
      return route.abort();
    });
    const page = await context.newPage();
    page.setDefaultTimeout(T);
    page.on("console", (m) => { if (m.type() === "error") result.consoleErrors.push(m.text().slice(0, 500)); });
    page.on("pageerror", (e) => result.pageErrors.push(String(e && e.stack || e).slice(0, 1500)));
    page.on("response", (x) => { if (x.status() >= 400) result.httpErrors.push(`${x.status()} ${x.request().method()} ${x.url()}`); });

    await page.goto(plan.url, { waitUntil: "domcontentloaded", timeout: T });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas && window.LiteGraph &&
      document.querySelector("canvas") && Object.keys(LiteGraph.registered_node_types).length > 50, null, { timeout: T });
    await sleep(500);
    mark("ui_ready");
    result.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || null);
    result.extensionHook = await page.evaluate(() => {
      try {
        window.__dcmMissing = null;
        app.registerExtension({ name: "dcm.browser-test", afterConfigureGraph(missing) { window.__dcmMissing = missing; } });
        return true;
      } catch (e) { return false; }
    });
    // Every toast the page shows (workflow validation warnings, "links fixed", alerts) is kept.
    await page.evaluate(() => {
      window.__dcmToasts = [];
      new MutationObserver(() => {
        for (const el of document.querySelectorAll(".p-toast-message")) {
          if (!window.__dcmToasts.includes(el)) window.__dcmToasts.push(el);
        }
      }).observe(document.body, { childList: true, subtree: true });
    });
    result.registeredDCM = await page.evaluate(() => Object.keys(LiteGraph.registered_node_types).filter((t) => t.startsWith("DCM")).sort());
    await closeDialogs(page);

    // ---- each UI workflow, fetched from the template route the frontend's template browser uses
    for (const wf of plan.workflows) {
      const r = (result.workflows[wf.name] = { error: null });
      phase = `workflow:${wf.name}`;
      try {
        await closeDialogs(page);
        const loaded = await page.evaluate(loadWorkflow, { ...wf, breakIt: false });
        Object.assign(r, loaded);
        if (loaded.fetchError) { r.error = loaded.fetchError; continue; }
        await collect(page, r);
        r.frame = await frameGraph(page, plan.scale || 0.85);
        r.screenshot = path.join(plan.outDir, `${wf.name}.png`);
        await page.screenshot({ path: r.screenshot });
      } catch (e) {
        r.error = String(e && e.stack || e);
      }
      mark(`workflow:${wf.name}`);
      save();
    }

    // ---- negative control: the same workflow with an unknown node and a changed DCM widget
    if (plan.negative) {
      const r = (result.negative = { error: null, name: plan.negative.name });
      phase = "negative"; // the missing-nodes dialog asks api.comfy.org about the unknown node (blocked)
      try {
        await closeDialogs(page);
        Object.assign(r, await page.evaluate(loadWorkflow, { ...plan.negative, breakIt: true }));
        await collect(page, r);
        const n = r.changed && r.nodes.find((x) => String(x.id) === String(r.changed.id)); // 1.58: string ids
        r.changedWidget = n ? (n.widgets.find((w) => w.serialize) || {}).name : null;
        r.screenshot = path.join(plan.outDir, `negative_control_${plan.negative.name}.png`);
        await page.screenshot({ path: r.screenshot });
        await closeDialogs(page);
      } catch (e) {
        r.error = String(e && e.stack || e);
      }
      mark("negative");
      save();
    }

    // ---- queue tiny-model API workflows from the UI; wait on the server's history
    await page.setViewportSize({ width: 1600, height: 1000 });
    for (const q of plan.queue) {
      const r = (result.queued[q.name] = { error: null });
      phase = `queue:${q.name}`;
      try {
        await closeDialogs(page);
        r.missing = await page.evaluate(({ api, name }) => {
          const missing = Object.values(api).map((n) => n.class_type).filter((t) => !(t in LiteGraph.registered_node_types));
          if (!missing.length) app.loadApiJson(api, name);
          return missing;
        }, q);
        if (r.missing.length) { r.error = `node types not registered: ${r.missing.join(", ")}`; continue; }
        await sleep(300);
        await page.evaluate(() => {
          for (const n of app.graph.nodes) for (const w of n.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
        });
        const respP = page.waitForResponse((x) => /\/api\/prompt$/.test(new URL(x.url()).pathname) && x.request().method() === "POST", { timeout: T });
        r.queueReturned = await page.evaluate(() => app.queuePrompt(0, 1)); // false even on success (node_errors = {})
        const resp = await respP;
        r.httpStatus = resp.status();
        r.response = await resp.json().catch(() => null);
        const id = r.response && r.response.prompt_id;
        r.promptId = id || null;
        if (!id) { r.error = `POST /api/prompt answered ${r.httpStatus}: ${JSON.stringify(r.response).slice(0, 1500)}`; continue; }
        const tq = Date.now();
        while (Date.now() - tq < T) {
          const h = await (await fetch(`${plan.url}/api/history/${id}`)).json();
          if (h[id]) { r.history = h[id]; break; }
          await sleep(200);
        }
        r.seconds = (Date.now() - tq) / 1000;
        if (!r.history) { r.error = `no history for ${id} after ${T / 1000} s`; continue; }
        await sleep(300);
        r.frame = await frameGraph(page, plan.scale || 0.85);
        r.screenshot = path.join(plan.outDir, `queued_${q.name}.png`);
        await page.screenshot({ path: r.screenshot });
        await page.setViewportSize({ width: 1600, height: 1000 });
      } catch (e) {
        r.error = String(e && e.stack || e);
      }
      mark(`queue:${q.name}`);
      save();
    }
    result.ok = true;
  } finally {
    await browser.close().catch(() => {});
    mark("closed");
  }
}

main().catch((e) => { result.error = String(e && e.stack || e); }).finally(() => { save(); process.exit(0); });
