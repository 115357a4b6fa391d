-- One row per plan: a user's request (by its fingerprint) and the plan that answers it.
-- The unique constraint makes concurrent identical submissions store one row: the loser of
-- the race inserts nothing (ON CONFLICT) and reads the winner's row.
CREATE TABLE plans (
    id          INTEGER PRIMARY KEY,
    user_id     TEXT    NOT NULL,
    -- SHA-256 (hex) of the request's normalized fields; see request.rs.
    fingerprint TEXT    NOT NULL,
    -- 'llm': written by the upstream; 'offline': from templates, replaced by the next LLM plan.
    source      TEXT    NOT NULL CHECK (source IN ('llm', 'offline')),
    -- The request as the user sent it (trimmed), and the plan's sections, as JSON text.
    request     TEXT    NOT NULL,
    plan        TEXT    NOT NULL,
    -- Unix time in milliseconds.
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    CONSTRAINT plans_user_fingerprint UNIQUE (user_id, fingerprint)
);

CREATE INDEX plans_user_updated ON plans (user_id, updated_at);
