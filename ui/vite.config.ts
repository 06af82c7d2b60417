import { defineConfig } from "vite";

// The page is loaded from the app bundle (no dev server in CI), so assets
// use relative paths.
export default defineConfig({
  base: "./",
  build: { outDir: "dist", emptyOutDir: true, target: "es2021" },
  // uPlot goes through Vitest's module graph so each test loads it afresh
  // (Node caches a module that failed to load, which the locale test needs).
  test: { environment: "node", server: { deps: { inline: ["uplot"] } } },
});
