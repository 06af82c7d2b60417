import { describe, expect, it } from "vitest";
import type { NodeEvent } from "./bindings";
import { empty, fetchEta, onTick, reduce, runEta, secondsPerRound, share, type Tick, WINDOW } from "./state";

/** An event with only the fields a case needs, each typed as the node sends it. */
const ev = <K extends NodeEvent["event"]>(e: { event: K } & Partial<Extract<NodeEvent, { event: K }>>) => e as NodeEvent;
/** A payload that does not match the node's types, as a broken or foreign sender might emit. */
const raw = (e: { event: string; [key: string]: unknown }) => e as unknown as NodeEvent;

const tick = (t: number, up: number, down: number, cap: number | null = 10): Tick => ({
  t,
  bytes_up: up,
  bytes_down: down,
  up_cap_mbit: cap,
  down_cap_mbit: 100,
  activity: "running",
  gpu_util: null,
  gpu_temp_c: null,
  gpu_mem_used: null,
  gpu_mem_total: null,
});

describe("dashboard state", () => {
  it("turns counter ticks into rates and keeps a bounded window", () => {
    let d = onTick(empty(), tick(100, 0, 0));
    d = onTick(d, tick(101, 1_250_000, 2_500_000));
    expect(d.upMbit.at(-1)).toBe(10);
    expect(d.downMbit.at(-1)).toBe(20);
    expect(d.upCap.at(-1)).toBe(10);
    for (let i = 0; i < WINDOW + 50; i++) d = onTick(d, tick(102 + i, 1_250_000, 2_500_000));
    expect(d.times.length).toBe(WINDOW);
    expect(d.upMbit.at(-1)).toBe(0);
  });

  it("moves the limit line when the caps change", () => {
    let d = onTick(empty(), tick(1, 0, 0, 10));
    d = reduce(d, ev({ event: "caps", up_mbit: 4, down_mbit: null }));
    expect(d.upCap.at(-1)).toBe(4);
    expect(d.downCap.at(-1)).toBeNull();
  });

  it("puts the run's eval loss on its round, whichever event comes first", () => {
    let d = empty();
    d = reduce(d, ev({ event: "round_applied", round: 0, loss: 5, eval_loss: null }));
    d = reduce(d, ev({ event: "evaluated", round: 0, eval_loss: 4.5 }));
    d = reduce(d, ev({ event: "evaluated", round: 1, eval_loss: 4.25 }));
    d = reduce(d, ev({ event: "round_applied", round: 1, loss: 4.75, eval_loss: null }));
    d = reduce(d, ev({ event: "round_applied", round: 2, loss: 4.5, eval_loss: null }));
    expect(d.lossRounds).toEqual([0, 1, 2]);
    expect(d.evalLoss).toEqual([4.5, 4.25, null]);
  });

  it("tracks a checkpoint download with its rate and time left", () => {
    let d = empty();
    d = reduce(d, ev({ event: "state", state: "catching_up", detail: "fetching the checkpoint" }), 0);
    d = reduce(d, ev({ event: "fetching", what: "checkpoint", done: 1_000_000, total: 11_000_000 }), 10);
    expect(fetchEta(d.fetch!)).toEqual({ rate: null, left: null });
    d = reduce(d, ev({ event: "fetching", what: "checkpoint", done: 3_000_000, total: 11_000_000 }), 12);
    expect(fetchEta(d.fetch!)).toEqual({ rate: 1_000_000, left: 8 });
    const logged = d.log.length;
    d = reduce(d, ev({ event: "fetching", what: "checkpoint", done: 11_000_000, total: 11_000_000 }), 20);
    expect(d.fetch).toBeNull();
    expect(d.log.length).toBe(logged + 1);
    // A download cut off by a new state leaves no stale bar behind.
    d = reduce(d, ev({ event: "fetching", what: "checkpoint", done: 5, total: 10 }), 21);
    d = reduce(d, ev({ event: "state", state: "connecting", detail: "retrying" }), 22);
    expect(d.fetch).toBeNull();
  });

  it("adds up compute time and run tokens and estimates the end of the run", () => {
    let d = empty();
    d = reduce(d, ev({ event: "joined", run: "r", params: 10, round: 0, total_rounds: 100 }), 0);
    d = reduce(d, ev({ event: "trained", round: 0, tokens: 64, loss: 5, secs: 0.5 }));
    // The run had trained on 10 000 tokens before this node joined.
    d = reduce(d, ev({ event: "round_applied", round: 0, loss: 5, eval_loss: null, tokens: 192, run_tokens: 10192 }), 10);
    d = reduce(d, ev({ event: "trained", round: 1, tokens: 64, loss: 4, secs: 0.25 }));
    d = reduce(d, ev({ event: "round_applied", round: 1, loss: 4, eval_loss: null, tokens: 192, run_tokens: 10384 }), 12);
    expect(d.computeSecs).toBe(0.75);
    expect(d.runTokens).toBe(10384);
    // A node that does not send the run's count: what it applied.
    expect(reduce(empty(), ev({ event: "round_applied", round: 0, loss: 5, eval_loss: null, tokens: 192 })).runTokens).toBe(192);
    // 2 s a round, 98 rounds to go.
    expect(runEta(d, 12)).toBe(196);
    expect(runEta({ ...d, totalRounds: 0 }, 12)).toBeNull();
  });

  it("shows the ledger's month and today against the monthly cap", () => {
    const d = reduce(empty(), ev({ event: "usage", month: "2026-12", up: 300, down: 700, cap: 5000, today: 400 }));
    expect([d.month, d.monthBytes, d.monthlyCap, d.todayBytes]).toEqual(["2026-12", 1000, 5000, 400]);
  });

  it("keeps the latest peer list out of the log", () => {
    const peers = [{ peer: "ab12", host: true, rtt_ms: 0.4, relayed: false, bytes_down: 9000, down_bytes_per_sec: 1e6 }];
    const d = reduce(empty(), ev({ event: "peers", node: "n", peers }));
    expect(d.peerList).toEqual(peers);
    expect(d.log).toEqual([]);
    expect(reduce(d, raw({ event: "peers", peers: "garbage" })).peerList).toEqual([]);
  });

  it("collects rounds, losses and contribution", () => {
    let d = empty();
    d = reduce(d, ev({ event: "joined", run: "r", params: 1000, round: 0 }), 10);
    d = reduce(d, ev({ event: "round_opened", round: 0, members: 3 }));
    d = reduce(d, ev({ event: "trained", round: 0, tokens: 128, loss: 5.5 }));
    d = reduce(d, ev({ event: "round_applied", round: 0, updates: 3, loss: 5.5, eval_loss: null, bytes_up: 10, bytes_down: 20 }), 20);
    d = reduce(d, ev({ event: "trained", round: 1, tokens: 128, loss: 5 }));
    d = reduce(d, ev({ event: "round_applied", round: 1, updates: 3, loss: 5, eval_loss: 4.9, bytes_up: 11, bytes_down: 21 }), 30);
    expect(d.round).toBe(1);
    expect(d.lossRounds).toEqual([0, 1]);
    expect(d.loss).toEqual([5.5, 5]);
    expect(d.evalLoss).toEqual([null, 4.9]);
    expect(d.tokensTrained).toBe(256);
    expect(d.peers).toBe(3);
    expect(d.roundUp).toBe(11);
    expect(secondsPerRound(d, 40)).toBe(20);
    expect(share(d.roundsTrained, d.lossRounds.length, d.peers)).toBeCloseTo(1 / 3);
    expect(d.log.at(-1)).toContain("round 1: applied 3 updates");
  });

  it("counts a round replayed after a rejoin once and keeps the chart in round order", () => {
    let d = empty();
    d = reduce(d, ev({ event: "joined", run: "r", params: 1000, round: 0 }), 0);
    d = reduce(d, ev({ event: "round_opened", round: 0, members: 1 }));
    for (const r of [0, 1, 2]) {
      d = reduce(d, ev({ event: "trained", round: r, tokens: 64, loss: 5 - r }));
      d = reduce(d, ev({ event: "round_applied", round: r, loss: 5 - r, eval_loss: null, tokens: 64, run_tokens: 64 * (r + 1) }), 10 + r);
    }
    // Paused, then resumed: the node replays the run from its start, then goes on.
    d = reduce(d, ev({ event: "joined", run: "r", params: 1000, round: 0 }), 30);
    for (const r of [0, 1, 2, 3]) {
      d = reduce(d, ev({ event: "round_applied", round: r, loss: 5 - r, eval_loss: null, tokens: 64, run_tokens: 64 * (r + 1) }), 31);
    }
    expect(d.lossRounds).toEqual([0, 1, 2, 3]);
    expect(d.loss).toEqual([5, 4, 3, 2]);
    expect(d.round).toBe(3);
    expect(d.runTokens).toBe(256);
    expect(share(d.roundsTrained, d.lossRounds.length, 1)).toBe(0.75);
    // The run's pace: 3 rounds in 21 s, pause included.
    expect(secondsPerRound(d, 31)).toBe(7);
    // A round that arrives after a later one goes in its place.
    d = reduce(d, ev({ event: "round_applied", round: 5, loss: 1, eval_loss: null }), 40);
    d = reduce(d, ev({ event: "round_applied", round: 4, loss: 1.5, eval_loss: null }), 41);
    expect(d.lossRounds).toEqual([0, 1, 2, 3, 4, 5]);
    expect(d.loss).toEqual([5, 4, 3, 2, 1.5, 1]);
    expect(d.round).toBe(5);
  });

  it("ignores malformed values instead of drawing them", () => {
    const d = reduce(empty(), raw({ event: "round_applied", round: "x" }));
    expect(d.round).toBeNull();
    expect(d.lossRounds).toEqual([]);
  });
});
