// The dashboard page: draws the state folded from the node's events and
// sends the volunteer's clicks to the shell's commands.

// First: makes navigator.language usable by Intl before uPlot loads.
import "./locale";
import { invoke } from "@tauri-apps/api/core";
import { listen } from "@tauri-apps/api/event";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import "./style.css";
import { formatBytes, formatDuration, formatNumber, formatRate } from "./format";
import type { ErrorInfo, MachineReport, NodeEvent, Settings, Status } from "./bindings";
import { fromForm, toForm } from "./settings";
import { empty, fetchEta, onTick, reduce, runEta, secondsPerRound, share, type Dashboard, type Tick } from "./state";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
let dash: Dashboard = empty();
let settings: Settings | null = null;

function dark(): boolean {
  return window.matchMedia?.("(prefers-color-scheme: dark)").matches ?? false;
}

// Read at every draw, so a theme switch only needs a redraw.
const axisColour = () => (dark() ? "#ccc" : "#333");
const gridColour = () => (dark() ? "#444" : "#ddd");

const ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000];

function chart(el: HTMLElement, title: string, series: uPlot.Series[], time: boolean): uPlot {
  return new uPlot(
    {
      title,
      width: Math.max(320, el.clientWidth || 600),
      height: 220,
      scales: { x: { time } },
      axes: [
        // Rounds are whole numbers: no ticks between them.
        { stroke: axisColour, grid: { stroke: gridColour }, ...(time ? {} : { incrs: ROUND_STEPS }) },
        { stroke: axisColour, grid: { stroke: gridColour } },
      ],
      series: [{}, ...series],
    },
    [[], ...series.map(() => [])] as uPlot.AlignedData,
    el,
  );
}

const lossChart = chart(
  $("loss-chart"),
  "Run loss by round",
  [
    { label: "loss", stroke: "#3b82f6", width: 2 },
    { label: "eval loss", stroke: "#f59e0b", width: 2, points: { show: true }, spanGaps: true },
  ],
  false,
);
// Upload and download on their own scales, so a 5 Mbit/s cap next to a
// 50 Mbit/s one still reads clearly.
const upChart = chart(
  $("up-chart"),
  "Upload (Mbit/s)",
  [
    { label: "upload", stroke: "#10b981", width: 2 },
    { label: "limit", stroke: "#dc2626", dash: [6, 4], width: 1.5 },
  ],
  true,
);
const downChart = chart(
  $("down-chart"),
  "Download (Mbit/s)",
  [
    { label: "download", stroke: "#8b5cf6", width: 2 },
    { label: "limit", stroke: "#dc2626", dash: [6, 4], width: 1.5 },
  ],
  true,
);

// The charts follow the window's width and the system's theme.
const charts = [
  [lossChart, "loss-chart"],
  [upChart, "up-chart"],
  [downChart, "down-chart"],
] as const;
window.addEventListener("resize", () => {
  for (const [c, id] of charts) {
    c.setSize({ width: Math.max(320, $(id).clientWidth), height: 220 });
  }
});
window.matchMedia?.("(prefers-color-scheme: dark)").addEventListener("change", () => {
  for (const [c] of charts) {
    c.redraw(false);
  }
});

function renderPeers(): void {
  const rows = dash.peerList.map((p) => {
    const tr = document.createElement("tr");
    for (const cell of [
      p.peer,
      p.host ? "host" : "volunteer",
      p.rtt_ms === null ? "–" : `${formatNumber(p.rtt_ms)} ms`,
      p.relayed ? "relayed" : "direct",
      p.down_bytes_per_sec === null ? "–" : formatRate(p.down_bytes_per_sec),
      formatBytes(p.bytes_down),
    ]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.append(td);
    }
    return tr;
  });
  $("peer-table").querySelector("tbody")!.replaceChildren(...rows);
  $("peer-empty").hidden = rows.length > 0;
}

function renderFetch(): void {
  const f = dash.fetch;
  $("fetch").hidden = f === null;
  if (f) {
    ($("fetch-bar") as HTMLProgressElement).value = f.total > 0 ? f.done / f.total : 0;
    const { rate, left } = fetchEta(f);
    $("fetch-text").textContent =
      `Downloading the ${f.what}: ${formatBytes(f.done)} of ${formatBytes(f.total)}` +
      (rate === null || left === null ? "" : ` at ${formatRate(rate)}, about ${formatDuration(left)} left`);
  }
}

function render(): void {
  document.querySelector("main")!.classList.toggle("first-run", dash.run === null);
  $("activity").textContent = dash.activity;
  $("activity").dataset.state = dash.state;
  $("detail").textContent = dash.detail;
  $("round").textContent = dash.round === null ? "–" : String(dash.round);
  $("trained").textContent = String(dash.roundsTrained);
  $("tokens").textContent = formatNumber(dash.tokensTrained);
  const s = share(dash.roundsTrained, dash.lossRounds.length, dash.peers);
  $("share").textContent = s === null ? "–" : `${formatNumber(s * 100)} %`;
  $("peers").textContent = String(dash.peers);
  const pace = secondsPerRound(dash);
  $("pace").textContent = pace === null ? "–" : formatDuration(pace);
  $("compute").textContent = formatDuration(dash.computeSecs);
  $("run-tokens").textContent = formatNumber(dash.runTokens);
  const eta = runEta(dash);
  $("eta").textContent =
    dash.run === null ? "–" : dash.totalRounds <= 0 ? "no set end" : eta === null ? "–" : formatDuration(eta);
  $("eta-rounds").textContent =
    dash.totalRounds > 0 && dash.round !== null ? `round ${dash.round + 1} of ${dash.totalRounds}` : "";
  const t = dash.lastTick;
  const up = dash.upMbit.at(-1) ?? 0;
  const down = dash.downMbit.at(-1) ?? 0;
  $("up-rate").textContent = formatRate((up * 1e6) / 8);
  $("down-rate").textContent = formatRate((down * 1e6) / 8);
  $("up-cap").textContent = t?.up_cap_mbit ? `limit ${t.up_cap_mbit} Mbit/s` : "no limit";
  $("down-cap").textContent = t?.down_cap_mbit ? `limit ${t.down_cap_mbit} Mbit/s` : "no limit";
  $("round-up").textContent = dash.round === null ? "–" : `${formatBytes(dash.roundUp)} sent`;
  $("round-down").textContent = dash.round === null ? "" : `${formatBytes(dash.roundDown)} received`;
  $("today-bytes").textContent = dash.todayBytes === null ? "–" : formatBytes(dash.todayBytes);
  $("month-bytes").textContent = dash.month ? formatBytes(dash.monthBytes) : "–";
  $("month-cap").textContent = dash.monthlyCap ? `of ${formatBytes(dash.monthlyCap)}` : "";
  $("gpu-util").textContent = t?.gpu_util == null ? "not reported" : `${t.gpu_util} %`;
  $("gpu-temp").textContent = t?.gpu_temp_c == null ? "not reported" : `${t.gpu_temp_c} °C`;
  $("gpu-mem").textContent =
    t?.gpu_mem_used == null || t.gpu_mem_total == null
      ? "not reported"
      : `${formatBytes(t.gpu_mem_used)} of ${formatBytes(t.gpu_mem_total)}`;
  lossChart.setData([dash.lossRounds, dash.loss, dash.evalLoss] as uPlot.AlignedData);
  upChart.setData([dash.times, dash.upMbit, dash.upCap] as uPlot.AlignedData);
  downChart.setData([dash.times, dash.downMbit, dash.downCap] as uPlot.AlignedData);
  // What the canvases plot, readable by the end-to-end test and assistive tools.
  $("loss-chart").dataset.points = String(dash.lossRounds.length);
  $("loss-chart").dataset.evalPoints = String(dash.evalLoss.filter((v) => v !== null).length);
  $("up-chart").dataset.limit = String(dash.upCap.at(-1) ?? "none");
  $("down-chart").dataset.limit = String(dash.downCap.at(-1) ?? "none");
  renderPeers();
  renderFetch();
  $("log").textContent = dash.log.slice(-200).join("\n");
}

function showErrors(el: HTMLElement, errors: ErrorInfo["fields"]): void {
  el.textContent = errors.map((e) => `${e.field}: ${e.message}`).join("\n");
}

function fillSettings(s: Settings): void {
  settings = s;
  const form = $("settings") as HTMLFormElement;
  for (const [name, value] of Object.entries(toForm(s))) {
    const input = form.elements.namedItem(name) as HTMLInputElement | HTMLSelectElement | null;
    if (!input) continue;
    if (input instanceof HTMLInputElement && input.type === "checkbox") input.checked = value === true;
    else input.value = String(value);
  }
}

function readForm(): Record<string, string | boolean> {
  const form = $("settings") as HTMLFormElement;
  const out: Record<string, string | boolean> = {};
  for (const el of Array.from(form.elements)) {
    if (!(el instanceof HTMLInputElement || el instanceof HTMLSelectElement) || !el.name) continue;
    out[el.name] = el instanceof HTMLInputElement && el.type === "checkbox" ? el.checked : el.value;
  }
  return out;
}

async function call(cmd: string, args?: Record<string, unknown>, errorEl = $("join-error")): Promise<boolean> {
  try {
    await invoke(cmd, args);
    errorEl.textContent = "";
    return true;
  } catch (e) {
    const err = e as Partial<ErrorInfo>;
    if (err.fields?.length) showErrors(errorEl, err.fields);
    else errorEl.textContent = err.message ?? String(e);
    return false;
  }
}

async function start(): Promise<void> {
  $("join").addEventListener("click", () => void call("join", { ticket: ($("ticket") as HTMLInputElement).value }));
  $("pause").addEventListener("click", () => void call("pause"));
  $("resume").addEventListener("click", () => void call("resume"));
  $("snooze").addEventListener("click", () => void call("snooze", { minutes: 60 }));
  for (const b of Array.from(document.querySelectorAll<HTMLButtonElement>("[data-preset]"))) {
    b.addEventListener("click", async () => {
      if (await call("apply_preset", { preset: b.dataset.preset }, $("settings-errors"))) {
        fillSettings((await invoke<Status>("status")).settings);
      }
    });
  }
  $("settings").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!settings) return;
    const { settings: next, errors } = fromForm(readForm(), settings);
    if (errors.length) return showErrors($("settings-errors"), errors);
    if (await call("save_settings", { settings: next }, $("settings-errors"))) settings = next;
  });
  await listen<NodeEvent>("node-event", (e) => {
    dash = reduce(dash, e.payload);
    render();
  });
  await listen<Tick>("tick", (e) => {
    dash = onTick(dash, e.payload);
    render();
  });
  await listen<string>("deep-link", (e) => {
    ($("ticket") as HTMLInputElement).value = e.payload;
    $("join-section").scrollIntoView();
  });
  const status = await invoke<Status>("status");
  fillSettings(status.settings);
  if (status.ticket) ($("ticket") as HTMLInputElement).value = status.ticket;
  const report = await invoke<MachineReport>("machine_report");
  const select = ($("settings") as HTMLFormElement).elements.namedItem("device") as HTMLSelectElement;
  select.innerHTML = "";
  for (const [value, label] of [["auto", "Automatic"], ...report.verdicts.filter((v) => v.usable).map((v) => [v.device, `${v.device}: ${v.name}`])]) {
    select.add(new Option(label, value));
  }
  select.value = status.settings.device;
  $("verdicts").innerHTML = "";
  for (const v of report.verdicts) {
    const li = document.createElement("li");
    li.textContent = `${v.device}: ${v.summary}`;
    li.className = v.usable ? "ok" : "no";
    $("verdicts").append(li);
  }
  render();
}

void start();
