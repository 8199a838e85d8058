-- The finished turns of `collabllm synth` (candidates, rewards, the next user message), keyed by
-- everything that produced them, so an interrupted run resumes where it stopped.
CREATE TABLE synth_turns (
    id BIGSERIAL PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    conversation TEXT NOT NULL,
    turn INTEGER NOT NULL,
    result_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
