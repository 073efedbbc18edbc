-- Whether callbacks to this organisation also carry the Standard Webhooks
-- headers (webhook-id, webhook-timestamp, webhook-signature).
ALTER TABLE orgs ADD COLUMN standard_webhooks INTEGER NOT NULL DEFAULT 0;
