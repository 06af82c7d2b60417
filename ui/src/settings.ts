// Settings as the form shows them (strings) and as the node stores them.
// Empty fields mean "no limit"; anything else must be a number, checked
// here first for instant feedback and again by the node, which has the
// final word.

import type { FieldError, Settings } from "./bindings";

export type FormValues = Record<string, string | boolean>;

function optNumber(v: string | boolean | undefined, field: string, errors: FieldError[], integer = false): number | null {
  const s = typeof v === "string" ? v.trim().replace(",", ".") : "";
  if (s === "") return null;
  const n = Number(s);
  if (!isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) {
    errors.push({ field, message: `must be ${integer ? "a whole" : "a"} number above 0, or empty for no limit` });
    return null;
  }
  return n;
}

export function fromForm(v: FormValues, current: Settings): { settings: Settings; errors: FieldError[] } {
  const errors: FieldError[] = [];
  const start = String(v.schedule_start ?? "").trim();
  const end = String(v.schedule_end ?? "").trim();
  if ((start === "") !== (end === "")) {
    errors.push({ field: "schedule", message: "give both a start and an end time, or neither" });
  }
  const settings: Settings = {
    up_mbit: optNumber(v.up_mbit, "up_mbit", errors),
    down_mbit: optNumber(v.down_mbit, "down_mbit", errors),
    monthly_cap_gb: optNumber(v.monthly_cap_gb, "monthly_cap_gb", errors),
    device: String(v.device || "auto"),
    vram_limit_gb: optNumber(v.vram_limit_gb, "vram_limit_gb", errors),
    idle_minutes: optNumber(v.idle_minutes, "idle_minutes", errors, true),
    pause_on_battery: v.pause_on_battery === true,
    schedule: start && end ? { start, end } : null,
    max_gpu_temp_c: optNumber(v.max_gpu_temp_c, "max_gpu_temp_c", errors, true),
    start_at_login: v.start_at_login === true,
    ticket: current.ticket,
  };
  return { settings, errors };
}

export function toForm(s: Settings): FormValues {
  const str = (n: number | null) => (n === null ? "" : String(n));
  return {
    up_mbit: str(s.up_mbit),
    down_mbit: str(s.down_mbit),
    monthly_cap_gb: str(s.monthly_cap_gb),
    device: s.device,
    vram_limit_gb: str(s.vram_limit_gb),
    idle_minutes: str(s.idle_minutes),
    pause_on_battery: s.pause_on_battery,
    schedule_start: s.schedule?.start ?? "",
    schedule_end: s.schedule?.end ?? "",
    max_gpu_temp_c: str(s.max_gpu_temp_c),
    start_at_login: s.start_at_login,
  };
}
