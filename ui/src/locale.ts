// Imported first by the page, before uPlot: uPlot builds
// Intl.NumberFormat(navigator.language) while it loads, and WebKitGTK under
// LANG=C.UTF-8 reports the language "C", which Intl refuses with a RangeError
// that would stop the whole page from running. So a language Intl cannot use
// is replaced, for this page only, by one it can.

import { safeLocale } from "./format";

/** Make `nav.language` (and `languages`) something Intl accepts; says whether it had to. */
export function guardLanguage(nav: { language?: string; languages?: readonly string[] }): boolean {
  const safe = safeLocale(nav.language);
  if (safe === nav.language) return false;
  Object.defineProperty(nav, "language", { configurable: true, get: () => safe });
  Object.defineProperty(nav, "languages", { configurable: true, get: () => [safe] });
  return true;
}

if (typeof navigator !== "undefined") guardLanguage(navigator);
