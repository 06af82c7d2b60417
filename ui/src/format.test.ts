import { describe, expect, it, vi } from "vitest";
import { formatBytes, formatDuration, formatRate, safeLocale, toMbit } from "./format";

describe("format", () => {
  it("falls back when the webview reports the C locale", () => {
    expect(() => new Intl.NumberFormat("C")).toThrow();
    expect(safeLocale("C")).toBe("en-US");
    expect(safeLocale(undefined)).toBe("en-US");
    expect(safeLocale("de-DE")).toBe("de-DE");
  });

  it("loads under a C locale without throwing", async () => {
    vi.stubGlobal("navigator", { language: "C" });
    vi.resetModules();
    const m = await import("./format");
    expect(m.formatBytes(1500)).toBe("1.5 kB");
    vi.unstubAllGlobals();
  });

  it("formats sizes, rates and durations", () => {
    expect(formatBytes(999)).toBe("999 B");
    expect(formatBytes(2_500_000)).toBe("2.5 MB");
    expect(formatBytes(176_520)).toBe("177 kB");
    expect(formatBytes(41_823_000)).toBe("41.8 MB");
    expect(toMbit(1_250_000)).toBe(10);
    expect(formatRate(1_250_000)).toBe("10 Mbit/s");
    expect(formatDuration(0.44)).toBe("0.4 s");
    expect(formatDuration(42)).toBe("42 s");
    expect(formatDuration(90)).toBe("2 min");
    expect(formatDuration(-1)).toBe("–");
  });
});
