-- host:port of the callback URL; the dispatcher limits attempts in flight
-- per destination, so one slow receiver cannot hold every slot.
ALTER TABLE deliveries ADD COLUMN destination TEXT NOT NULL DEFAULT '';
