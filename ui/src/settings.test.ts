import { describe, expect, it } from "vitest";
import type { Settings } from "./bindings";
import { fromForm, toForm } from "./settings";

const base: Settings = {
  up_mbit: 5,
  down_mbit: 50,
  monthly_cap_gb: 200,
  device: "auto",
  vram_limit_gb: null,
  idle_minutes: null,
  pause_on_battery: true,
  schedule: null,
  max_gpu_temp_c: 83,
  start_at_login: false,
  ticket: "starling1abc",
};

describe("settings form", () => {
  it("round-trips and keeps the ticket", () => {
    const { settings, errors } = fromForm(toForm(base), base);
    expect(errors).toEqual([]);
    expect(settings).toEqual(base);
  });

  it("reads empty as no limit and decimal commas", () => {
    const { settings } = fromForm({ ...toForm(base), up_mbit: "", down_mbit: "12,5" }, base);
    expect(settings.up_mbit).toBeNull();
    expect(settings.down_mbit).toBe(12.5);
  });

  it("names every bad field", () => {
    const { errors } = fromForm(
      { ...toForm(base), up_mbit: "fast", idle_minutes: "2.5", schedule_start: "22:00", schedule_end: "" },
      base,
    );
    expect(errors.map((e) => e.field)).toEqual(["schedule", "up_mbit", "idle_minutes"]);
  });
});
