// Number formatting that survives any locale the webview reports.
//
// WebKitGTK reports navigator.language === "C" under LANG=C.UTF-8, and
// Intl.NumberFormat("C") throws a RangeError: everything here goes through
// safeLocale so a bad locale can never take the page down.

export function safeLocale(lang: string | undefined): string {
  if (!lang) return "en-US";
  try {
    new Intl.NumberFormat(lang);
    return lang;
  } catch {
    return "en-US";
  }
}

const locale = safeLocale(typeof navigator === "undefined" ? undefined : navigator.language);
const num = new Intl.NumberFormat(locale, { maximumFractionDigits: 2 });

export function formatNumber(n: number): string {
  return num.format(n);
}

const three = new Intl.NumberFormat(locale, { maximumSignificantDigits: 3 });

/** Bytes in decimal units with three significant digits ("177 kB", "2.5 MB"). */
export function formatBytes(n: number): string {
  if (n >= 1e9) return `${three.format(n / 1e9)} GB`;
  if (n >= 1e6) return `${three.format(n / 1e6)} MB`;
  if (n >= 1e3) return `${three.format(n / 1e3)} kB`;
  return `${three.format(n)} B`;
}

/** Bytes per second as Mbit/s. */
export function toMbit(bytesPerSec: number): number {
  return (bytesPerSec * 8) / 1e6;
}

export function formatRate(bytesPerSec: number): string {
  return `${num.format(toMbit(bytesPerSec))} Mbit/s`;
}

export function formatDuration(secs: number): string {
  if (!isFinite(secs) || secs < 0) return "–";
  if (secs < 10) return `${num.format(Math.round(secs * 10) / 10)} s`;
  if (secs < 60) return `${Math.round(secs)} s`;
  if (secs < 3600) return `${Math.round(secs / 60)} min`;
  return `${num.format(secs / 3600)} h`;
}
