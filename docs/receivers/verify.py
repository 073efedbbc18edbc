"""Verify an Outrider (Scout-compatible) callback signature.

Copy `verify` into your receiver; call it with the raw request body bytes,
before parsing them. Run this file to check it against the shared vectors:
    python3 docs/receivers/verify.py crates/outrider-signature/vectors.json
"""
import base64
import binascii
import hashlib
import hmac
import time


def verify(secret, header, body, now=None, tolerance=300):
    """Returns None if the signature is valid, else "malformed", "expired" or "mismatch"."""
    t, sigs = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            if t is not None:
                return "malformed"
            t = value
        elif key == "sig":
            try:
                sigs.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                return "malformed"
    # Whole seconds only: a 13-digit millisecond value is malformed.
    # ASCII digits only: str.isdigit() alone also takes "²" or "١".
    if t is None or not (t.isascii() and t.isdigit()) or len(t) > 10 or not sigs:
        return "malformed"
    now = int(time.time()) if now is None else now
    if abs(now - int(t)) > tolerance:
        return "expired"
    expected = hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).digest()
    if any(hmac.compare_digest(expected, sig) for sig in sigs):
        return None
    return "mismatch"


if __name__ == "__main__":
    import json
    import sys

    vectors = json.load(open(sys.argv[1], encoding="utf-8"))["vectors"]
    failed = 0
    for v in vectors:
        body = base64.b64decode(v["body_base64"])
        got = verify(v["secret"], v["header"], body, now=v["now"])
        want = None if v["valid"] else v["error"]
        if got != want:
            failed += 1
            print(f"FAIL {v['name']}: got {got}, want {want}")
    print(f"{len(vectors) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
