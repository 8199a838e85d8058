-- A session resumes in another browser only with proof: the HMAC of the Prolific SESSION_ID that
-- started it, or a researcher's handover from the console.
ALTER TABLE sessions ADD COLUMN resume_proof_hmac TEXT;
ALTER TABLE sessions ADD COLUMN handover_allowed BOOLEAN NOT NULL DEFAULT false;
-- Logging out revokes every console cookie issued to the researcher before that moment.
ALTER TABLE researchers ADD COLUMN sessions_valid_after TIMESTAMP;
-- What the server noticed about a session that is not a participant's frame: refused entries,
-- resumes in a new browser, handovers.
CREATE TABLE audit_events (
    id BIGSERIAL PRIMARY KEY,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    kind TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX audit_events_session ON audit_events (session_id);
-- Keys of the OpenAI-compatible /v1 API (`collabllm key add NAME`), as sha256 of the key.
CREATE TABLE api_keys (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at TIMESTAMP NOT NULL
);
