-- A session is found by the hash of its participant's token on every page and socket: without an
-- index each lookup read every session of the database. Idle sessions are looked for by state and
-- last activity.
CREATE UNIQUE INDEX sessions_token_hash ON sessions (token_hash);
CREATE INDEX sessions_state_activity ON sessions (state, last_activity_at);
