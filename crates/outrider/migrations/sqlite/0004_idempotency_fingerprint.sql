-- SHA-256 of what the first request asked for; a repeat of the key with a
-- different request is refused instead of answered with the first session.
ALTER TABLE idempotency_keys ADD COLUMN fingerprint BLOB;
