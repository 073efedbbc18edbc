-- Times are milliseconds since the Unix epoch.

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE signing_secrets (
    org_id      TEXT NOT NULL REFERENCES orgs (id),
    secret      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    -- NULL while active; set when a rotation retires it.
    retires_at  INTEGER
);
CREATE INDEX signing_secrets_by_org ON signing_secrets (org_id);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs (id),
    -- SHA-256 of the key's secret part; the key itself is never stored.
    key_hash    BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs (id),
    spec        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX agents_by_org ON agents (org_id, id);

CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    org_id           TEXT NOT NULL REFERENCES orgs (id),
    agent_id         TEXT NOT NULL,
    -- The agent as it was when the session was accepted.
    agent            TEXT NOT NULL,
    status           TEXT NOT NULL,
    input            TEXT NOT NULL,
    metadata         TEXT,
    callback_url     TEXT,
    output           TEXT,
    error_code       TEXT,
    error_message    TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    claims           INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_until      INTEGER
);
CREATE INDEX sessions_queued ON sessions (status, created_at);
CREATE INDEX sessions_leased ON sessions (status, lease_until);

CREATE TABLE events (
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;

CREATE TABLE idempotency_keys (
    org_id      TEXT NOT NULL,
    key         TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, key)
) WITHOUT ROWID;

CREATE TABLE deliveries (
    -- Also the callback_event_id the receiver deduplicates on.
    id               TEXT PRIMARY KEY,
    session_id       TEXT NOT NULL UNIQUE,
    org_id           TEXT NOT NULL,
    url              TEXT NOT NULL,
    -- The exact bytes sent on every attempt.
    body             BLOB NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,
    deadline_at      INTEGER NOT NULL,
    last_status_code INTEGER,
    last_error       TEXT,
    lease_owner      TEXT,
    lease_until      INTEGER,
    created_at       INTEGER NOT NULL,
    completed_at     INTEGER
);
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);

CREATE TABLE delivery_attempts (
    delivery_id    TEXT NOT NULL,
    n              INTEGER NOT NULL,
    started_at     INTEGER NOT NULL,
    duration_ms    INTEGER NOT NULL,
    status_code    INTEGER,
    error_kind     TEXT,
    error_message  TEXT,
    PRIMARY KEY (delivery_id, n)
) WITHOUT ROWID;
