// Verify an Outrider (Scout-compatible) callback signature in Node.js.
//
// Copy `verify` into your receiver; call it with the raw request body (a
// Buffer), before parsing it. Run this file to check it against the vectors:
//     node docs/receivers/verify.mjs crates/outrider-signature/vectors.json
import { createHmac, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";

// Returns null if valid, else "malformed", "expired" or "mismatch".
export function verify(secret, header, body, now = Math.floor(Date.now() / 1000), tolerance = 300) {
  let t = null;
  const sigs = [];
  for (const part of header.split(",")) {
    const [key, ...rest] = part.trim().split("=");
    const value = rest.join("=");
    if (key === "t") {
      if (t !== null) return "malformed";
      t = value;
    }
    if (key === "sig") {
      if (!/^[A-Za-z0-9+/]+={0,2}$/.test(value)) return "malformed";
      sigs.push(Buffer.from(value, "base64"));
    }
  }
  // Whole seconds only: a 13-digit millisecond value is malformed.
  if (t === null || !/^\d{1,10}$/.test(t) || sigs.length === 0) return "malformed";
  if (Math.abs(now - Number(t)) > tolerance) return "expired";
  const expected = createHmac("sha256", secret).update(`${t}.`).update(body).digest();
  const ok = sigs.some((sig) => sig.length === expected.length && timingSafeEqual(sig, expected));
  return ok ? null : "mismatch";
}

if (process.argv[2]) {
  const { vectors } = JSON.parse(readFileSync(process.argv[2], "utf8"));
  let failed = 0;
  for (const v of vectors) {
    const got = verify(v.secret, v.header, Buffer.from(v.body_base64, "base64"), v.now);
    const want = v.valid ? null : v.error;
    if (got !== want) {
      failed += 1;
      console.log(`FAIL ${v.name}: got ${got}, want ${want}`);
    }
  }
  console.log(`${vectors.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}
