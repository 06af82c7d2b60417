import { afterEach, describe, expect, it, vi } from "vitest";
import { guardLanguage } from "./locale";

// The page as WebKitGTK shows it under LANG=C.UTF-8: a window whose
// navigator.language is "C".
function cLocaleWindow() {
  const nav = { language: "C", languages: ["C"], userAgent: "test" };
  vi.stubGlobal("navigator", nav);
  const media = () => ({ matches: false, addListener() {}, removeListener() {}, addEventListener() {} });
  const win = { navigator: nav, devicePixelRatio: 1, matchMedia: media, addEventListener() {}, dispatchEvent() {} };
  vi.stubGlobal("window", win);
  vi.stubGlobal("devicePixelRatio", 1);
  vi.stubGlobal("matchMedia", media);
  vi.stubGlobal("document", { createElement: () => ({ style: {}, classList: { add() {} } }), addEventListener() {} });
  return nav;
}

describe("the C locale guard", () => {
  afterEach(() => {
    vi.unstubAllGlobals();
    vi.resetModules();
  });

  it("replaces a language Intl refuses and keeps a good one", () => {
    const bad = { language: "C" };
    expect(guardLanguage(bad)).toBe(true);
    expect(bad.language).toBe("en-US");
    const good = { language: "de-DE" };
    expect(guardLanguage(good)).toBe(false);
    expect(good.language).toBe("de-DE");
  });

  it("uPlot fails to load under the C locale without the guard", async () => {
    cLocaleWindow();
    await expect(import("uplot")).rejects.toThrow(RangeError);
  });

  it("uPlot loads under the C locale when the guard is imported first", async () => {
    const nav = cLocaleWindow();
    await import("./locale");
    expect(nav.language).toBe("en-US");
    await expect(import("uplot")).resolves.toBeDefined();
  });
});
