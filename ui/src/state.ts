// The dashboard's model: a pure fold over the node's event stream and the
// shell's once-a-second traffic ticks, so every number on screen is
// unit-tested without a window.

// The event types are generated from the node's Rust types (bindings.ts), so
// each case below sees its own fields; nothing checks a payload at runtime,
// so the fold still guards every value it draws.
import type { NodeEvent, PeerView, Tick } from "./bindings";

/** What the shell sends every second (the node's `Tick`). */
export type { Tick };

/** A download in progress (the checkpoint), as the node reports it. */
export interface Fetch {
  what: string;
  done: number;
  total: number;
  /** When and at how many bytes the first report came, for the rate. */
  since: number;
  sinceDone: number;
  at: number;
}

export interface Dashboard {
  state: string; // connecting, training, paused, ...
  detail: string;
  activity: string;
  run: string | null;
  params: number | null;
  round: number | null;
  roundsTrained: number;
  tokensTrained: number;
  /** Seconds this machine spent in training steps. */
  computeSecs: number;
  /** Tokens the whole run has trained on (the coordinator's count in each manifest). */
  runTokens: number;
  /** Rounds the run lasts (0: no set end). */
  totalRounds: number;
  peers: number;
  /** Rounds applied here, in order and each once (their count is the rounds applied). */
  lossRounds: number[];
  loss: (number | null)[];
  evalLoss: (number | null)[];
  /** The run's eval losses by round, which may arrive before that round's apply. */
  evals: Record<number, number>;
  times: number[];
  upMbit: number[];
  downMbit: number[];
  upCap: (number | null)[];
  downCap: (number | null)[];
  roundUp: number;
  roundDown: number;
  month: string | null;
  monthBytes: number;
  /** Bytes both ways today (UTC), from the node's ledger. */
  todayBytes: number | null;
  monthlyCap: number | null;
  lastTick: Tick | null;
  fetch: Fetch | null;
  peerList: PeerView[];
  startedAt: number | null;
  /** The first round this dashboard saw applied, and when (the run's pace). */
  firstRound: number | null;
  firstRoundAt: number | null;
  log: string[];
}

/** Samples of traffic kept for the chart (10 minutes at one a second). */
export const WINDOW = 600;
/** Log lines kept. */
export const LOG_LINES = 300;

export function empty(): Dashboard {
  return {
    state: "idle",
    detail: "",
    activity: "idle",
    run: null,
    params: null,
    round: null,
    roundsTrained: 0,
    tokensTrained: 0,
    computeSecs: 0,
    runTokens: 0,
    totalRounds: 0,
    peers: 0,
    lossRounds: [],
    loss: [],
    evalLoss: [],
    evals: {},
    times: [],
    upMbit: [],
    downMbit: [],
    upCap: [],
    downCap: [],
    roundUp: 0,
    roundDown: 0,
    month: null,
    monthBytes: 0,
    todayBytes: null,
    monthlyCap: null,
    lastTick: null,
    fetch: null,
    peerList: [],
    startedAt: null,
    firstRound: null,
    firstRoundAt: null,
    log: [],
  };
}

function num(v: unknown): number | null {
  return typeof v === "number" && isFinite(v) ? v : null;
}

function pushLog(d: Dashboard, line: string): string[] {
  const log = [...d.log, line];
  return log.length > LOG_LINES ? log.slice(log.length - LOG_LINES) : log;
}

/** A one-line description of an event for the log view. */
export function describe(e: NodeEvent): string {
  switch (e.event) {
    case "state":
      return `${e.state}: ${e.detail}`;
    case "joined":
      return `joined "${e.run}" at round ${e.round}`;
    case "round_opened":
      return `round ${e.round} open with ${e.members} members`;
    case "trained":
      return `round ${e.round}: trained ${e.tokens} tokens, loss ${num(e.loss)?.toFixed(4)}`;
    case "round_applied":
      return `round ${e.round}: applied ${e.updates} updates`;
    case "rejected":
      return `round ${e.round}: rejected ${e.peer}: ${e.reason}`;
    case "caps":
      return `caps: up ${e.up_mbit ?? "unlimited"}, down ${e.down_mbit ?? "unlimited"} Mbit/s`;
    case "warning":
      return `warning: ${e.message}`;
    case "usage":
      return `${e.month}: ${Number(e.up) + Number(e.down)} bytes used`;
    case "evaluated":
      return `round ${e.round}: run eval loss ${num(e.eval_loss)?.toFixed(4)}`;
    default:
      return e.event;
  }
}

export function reduce(d: Dashboard, e: NodeEvent, now = Date.now() / 1000): Dashboard {
  // Progress reports come several times a second: they update the bar, not the log.
  const quiet = e.event === "fetching" || e.event === "peers";
  const next: Dashboard = quiet ? { ...d } : { ...d, log: pushLog(d, describe(e)) };
  switch (e.event) {
    case "state":
      next.state = String(e.state);
      next.detail = String(e.detail ?? "");
      if (next.state !== "catching_up") next.fetch = null;
      break;
    case "joined":
      next.run = String(e.run);
      next.params = num(e.params);
      next.totalRounds = num(e.total_rounds) ?? 0;
      next.startedAt = now;
      break;
    case "round_opened":
      next.peers = num(e.members) ?? next.peers;
      break;
    case "trained":
      next.roundsTrained += 1;
      next.tokensTrained += num(e.tokens) ?? 0;
      next.computeSecs += num(e.secs) ?? 0;
      break;
    case "round_applied": {
      const round = num(e.round);
      if (round === null) break;
      next.roundUp = num(e.bytes_up) ?? 0;
      next.roundDown = num(e.bytes_down) ?? 0;
      const loss = num(e.loss);
      const evalLoss = num(e.eval_loss) ?? d.evals[round] ?? null;
      const seen = d.lossRounds.indexOf(round);
      if (seen >= 0) {
        // A round replayed while catching up after a rejoin: the same
        // manifest again, so nothing new to count or draw.
        next.loss = d.loss.map((v, j) => (j === seen ? loss : v));
        next.evalLoss = d.evalLoss.map((v, j) => (j === seen ? evalLoss : v));
        break;
      }
      next.round = Math.max(round, d.round ?? round);
      next.runTokens = Math.max(d.runTokens, num(e.run_tokens) ?? d.runTokens + (num(e.tokens) ?? 0));
      next.firstRound ??= round;
      next.firstRoundAt ??= now;
      // Keep the chart's rounds in order (a round can only arrive late on a replay).
      const at = d.lossRounds.findIndex((r) => r > round);
      const i = at < 0 ? d.lossRounds.length : at;
      next.lossRounds = insertAt(d.lossRounds, i, round);
      next.loss = insertAt(d.loss, i, loss);
      next.evalLoss = insertAt(d.evalLoss, i, evalLoss);
      break;
    }
    case "evaluated": {
      const round = num(e.round);
      const loss = num(e.eval_loss);
      if (round === null || loss === null) break;
      next.evals = { ...d.evals, [round]: loss };
      const i = d.lossRounds.lastIndexOf(round);
      if (i >= 0) next.evalLoss = d.evalLoss.map((v, j) => (j === i ? loss : v));
      break;
    }
    case "fetching": {
      const done = num(e.done) ?? 0;
      const total = num(e.total) ?? 0;
      const what = String(e.what);
      const same = d.fetch !== null && d.fetch.what === what && d.fetch.total === total && done >= d.fetch.done;
      next.fetch = same
        ? { ...d.fetch!, done, at: now }
        : { what, done, total, since: now, sinceDone: done, at: now };
      if (total > 0 && done >= total) {
        next.fetch = null;
        next.log = pushLog(d, `${what}: ${total} bytes received`);
      }
      break;
    }
    case "peers":
      next.peerList = Array.isArray(e.peers) ? e.peers : [];
      break;
    case "caps":
      next.upCap = d.upCap.length ? [...d.upCap.slice(0, -1), num(e.up_mbit)] : [];
      next.downCap = d.downCap.length ? [...d.downCap.slice(0, -1), num(e.down_mbit)] : [];
      break;
    case "usage":
      next.month = String(e.month);
      next.monthBytes = (num(e.up) ?? 0) + (num(e.down) ?? 0);
      next.monthlyCap = num(e.cap);
      next.todayBytes = num(e.today);
      break;
  }
  return next;
}

function insertAt<T>(xs: T[], i: number, x: T): T[] {
  return [...xs.slice(0, i), x, ...xs.slice(i)];
}

function keep<T>(xs: T[], x: T): T[] {
  const out = [...xs, x];
  return out.length > WINDOW ? out.slice(out.length - WINDOW) : out;
}

export function onTick(d: Dashboard, t: Tick): Dashboard {
  const prev = d.lastTick;
  const dt = prev ? t.t - prev.t : 0;
  const up = prev && dt > 0 ? Math.max(0, t.bytes_up - prev.bytes_up) / dt : 0;
  const down = prev && dt > 0 ? Math.max(0, t.bytes_down - prev.bytes_down) / dt : 0;
  return {
    ...d,
    activity: t.activity,
    lastTick: t,
    times: keep(d.times, t.t),
    upMbit: keep(d.upMbit, (up * 8) / 1e6),
    downMbit: keep(d.downMbit, (down * 8) / 1e6),
    upCap: keep(d.upCap, t.up_cap_mbit),
    downCap: keep(d.downCap, t.down_cap_mbit),
  };
}

/** The run's seconds per round since the first round applied here (null until a later one). */
export function secondsPerRound(d: Dashboard, now = Date.now() / 1000): number | null {
  if (d.firstRoundAt === null || d.firstRound === null || d.round === null || d.round <= d.firstRound) return null;
  return (now - d.firstRoundAt) / (d.round - d.firstRound);
}

/** This node's share of the run's work: its updates over all updates applied. */
export function share(trained: number, applied: number, members: number): number | null {
  if (applied === 0 || members === 0) return null;
  return Math.min(1, trained / (applied * members));
}

/** Bytes per second of a download so far, and seconds left at that rate (null until measurable). */
export function fetchEta(f: Fetch): { rate: number | null; left: number | null } {
  const secs = f.at - f.since;
  const bytes = f.done - f.sinceDone;
  if (secs < 0.5 || bytes <= 0) return { rate: null, left: null };
  const rate = bytes / secs;
  return { rate, left: Math.max(0, f.total - f.done) / rate };
}

/** Seconds until the run's last round at the pace seen so far (null without an end or a pace). */
export function runEta(d: Dashboard, now = Date.now() / 1000): number | null {
  const pace = secondsPerRound(d, now);
  if (d.totalRounds <= 0 || d.round === null || pace === null) return null;
  return Math.max(0, d.totalRounds - 1 - d.round) * pace;
}
