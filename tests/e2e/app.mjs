// End-to-end test of the desktop app: drives the real Starling window through
// WebDriver (tauri-driver in front of WebKitWebDriver) against a live local
// `starling host` run, the way a volunteer would use it. Speaks the W3C
// WebDriver protocol with Node's own fetch, so it needs no npm packages.
//
// Environment: STARLING_E2E_APP (the app binary), STARLING_E2E_TICKET (the
// host's join ticket), STARLING_E2E_DRIVER (driver URL, default
// http://127.0.0.1:4444), STARLING_E2E_SHOTS (screenshot folder).
// Run by scripts/e2e.sh, which starts the host, the driver and Xvfb.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const app = need("STARLING_E2E_APP");
const ticket = need("STARLING_E2E_TICKET");
const driver = process.env.STARLING_E2E_DRIVER ?? "http://127.0.0.1:4444";
const shots = process.env.STARLING_E2E_SHOTS ?? "runs/e2e-screenshots";
const ELEMENT = "element-6066-11e4-a52e-4f735466cecf";

function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run scripts/e2e.sh)`);
  return v;
}

function log(msg) {
  console.log(`[e2e ${new Date().toISOString().slice(11, 19)}] ${msg}`);
}

async function wd(method, path, body) {
  const res = await fetch(`${driver}${path}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json().catch(() => ({}));
  if (!res.ok) {
    const v = json.value ?? {};
    throw new Error(`${method} ${path}: ${res.status} ${v.error ?? ""} ${v.message ?? ""}`.trim());
  }
  return json.value;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `probe` until it returns a truthy value; fail after `secs` saying `what`. */
async function until(what, secs, probe) {
  const end = Date.now() + secs * 1000;
  let last;
  for (;;) {
    try {
      const v = await probe();
      if (v) return v;
      last = "not yet";
    } catch (e) {
      last = e.message;
    }
    if (Date.now() > end) throw new Error(`timed out after ${secs} s waiting for ${what} (${last})`);
    await sleep(500);
  }
}

class Page {
  constructor(session) {
    this.s = `/session/${session}`;
    this.n = 0;
  }
  async el(css) {
    return (await wd("POST", `${this.s}/element`, { using: "css selector", value: css }))[ELEMENT];
  }
  async text(css) {
    return wd("GET", `${this.s}/element/${await this.el(css)}/text`);
  }
  async click(css) {
    await wd("POST", `${this.s}/element/${await this.el(css)}/click`, {});
  }
  async type(css, text) {
    const id = await this.el(css);
    await wd("POST", `${this.s}/element/${id}/clear`, {});
    await wd("POST", `${this.s}/element/${id}/value`, { text });
  }
  async js(script) {
    return wd("POST", `${this.s}/execute/sync`, { script, args: [] });
  }
  async int(css) {
    const t = (await this.text(css)).replace(/[^0-9]/g, "");
    return t === "" ? null : Number(t);
  }
  /** Save a screenshot, first scrolling `css` (default: the page's top) into view. */
  async shot(name, css) {
    await this.js(css ? `document.querySelector("${css}").scrollIntoView()` : "window.scrollTo(0, 0)");
    this.n += 1;
    const file = join(shots, `${String(this.n).padStart(2, "0")}-${name}.png`);
    writeFileSync(file, Buffer.from(await wd("GET", `${this.s}/screenshot`), "base64"));
    log(`screenshot ${file}`);
  }
}

async function main() {
  mkdirSync(shots, { recursive: true });
  await until("the WebDriver server", 30, () => wd("GET", "/status").then(() => true));
  const session = await wd("POST", "/session", {
    capabilities: { alwaysMatch: { "tauri:options": { application: app, args: [] } } },
  });
  const page = new Page(session.sessionId);
  let failed = null;
  try {
    await scenario(page);
    const final = process.env.STARLING_E2E_FINAL_SHOT;
    if (final) {
      const secs = Number(process.env.STARLING_E2E_FINAL_WAIT ?? 60);
      log(`letting the run go on for ${secs} s for ${final}`);
      await sleep(secs * 1000);
      await page.js("window.scrollTo(0, 0)");
      await sleep(500);
      writeFileSync(final, Buffer.from(await wd("GET", `${page.s}/screenshot`), "base64"));
      log(`screenshot ${final}`);
    }
  } catch (e) {
    failed = e;
    await page.shot("failure").catch(() => {});
    for (const id of ["join-error", "settings-errors", "log"]) {
      const text = await page.js(`return document.getElementById("${id}").textContent`).catch((e) => `(${e.message})`);
      console.error(`--- #${id} ---\n${String(text).split("\n").slice(-40).join("\n")}`);
    }
  } finally {
    await wd("DELETE", `/session/${session.sessionId}`).catch((e) => log(`ending the session: ${e.message}`));
  }
  if (failed) throw failed;
  log("passed");
}

async function scenario(page) {
  log("waiting for the machine check to fill the page");
  await until("the device verdicts", 120, async () => (await page.js("return document.querySelectorAll('#verdicts li').length")) > 0);
  const above = () =>
    page.js(
      "return document.getElementById('gpu-section').getBoundingClientRect().top < document.getElementById('progress-section').getBoundingClientRect().top",
    );
  if (!(await above())) throw new Error("before joining, the machine's verdicts are not next to the join box");
  await page.shot("first-run");

  log("joining with the host's ticket");
  await page.type("#ticket", ticket);
  await page.click("#join");
  const [first] = await until("the first applied round", 300, async () => {
    const round = await page.int("#round");
    return round !== null && [round];
  });
  log(`round ${first} applied`);
  const target = first + 3;
  // The run evaluates every 2 rounds (tests/e2e/run.toml).
  await until(`round ${target}, loss and eval-loss points`, 180, async () => {
    const round = await page.int("#round");
    const chart = await page.js("const d = document.getElementById('loss-chart').dataset; return [d.points, d.evalPoints]");
    return round !== null && round >= target && Number(chart[0]) >= 3 && Number(chart[1]) >= 1;
  });
  const trained = await page.int("#trained");
  if (!(trained > 0)) throw new Error(`the dashboard shows ${trained} rounds trained by this machine`);
  log(`round ${await page.int("#round")}, ${trained} rounds trained here`);
  await until("the host in the peer list", 30, async () =>
    page.js("return [...document.querySelectorAll('#peer-table tbody tr')].some((r) => r.cells[1].textContent === 'host')"),
  );
  const runTokens = await page.int("#run-tokens");
  if (!(runTokens > 0)) throw new Error(`the run's tokens show ${runTokens}`);
  const eta = await page.text("#eta");
  if (!/^[0-9.,]+ (s|min|h)$/.test(eta)) throw new Error(`the run's end shows "${eta}"`);
  if (await above()) throw new Error("after joining, the machine's verdicts still come before the progress");
  await page.shot("training");

  const upCap = () => page.js("return document.getElementById('up-chart').dataset.limit");
  const before = await upCap();
  const next = before === "4" ? "6" : "4";
  log(`changing the upload cap from ${before} to ${next} Mbit/s`);
  await page.type("input[name=up_mbit]", next);
  await page.click("#save");
  // The chart's limit line and the card's label, both fed by the node.
  await until(`the upload limit line and label at ${next}`, 30, async () => {
    return (await upCap()) === next && (await page.text("#up-cap")) === `limit ${next} Mbit/s`;
  });
  await page.shot("upload-cap", "#bandwidth-section");

  log("pausing");
  await page.click("#pause");
  await until("the paused state", 30, async () => (await page.text("#activity")) === "paused");
  const pausedAt = await page.int("#trained");
  await sleep(12_000);
  const still = await page.int("#trained");
  if (still !== pausedAt) throw new Error(`trained ${still - pausedAt} rounds while paused`);
  await page.shot("paused");

  log("resuming");
  await page.click("#resume");
  await until("training again", 240, async () => (await page.int("#trained")) > pausedAt);
  if ((await page.text("#activity")) !== "running") throw new Error("not running after resume");
  // The rejoin replays the run's rounds: the chart must not draw them twice.
  const points = Number(await page.js("return document.getElementById('loss-chart').dataset.points"));
  const round = await page.int("#round");
  if (points > round + 1) throw new Error(`${points} loss points for rounds 0 to ${round}`);
  await page.shot("resumed");
}

main().catch((e) => {
  console.error(`[e2e] FAILED: ${e.message}`);
  process.exit(1);
});
