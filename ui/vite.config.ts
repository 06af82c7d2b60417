import { defineConfig } from "vite";

// The page is loaded from the app bundle (no dev server in CI), so assets
// use relative paths.
export default defineConfig({
  base: "./",
  build: { outDir: "dist", emptyOutDir: true, target: "es2021" },
  test: { environment: "node" },
});
