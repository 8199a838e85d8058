-- Rollouts of the multiturn-aware reward: one simulated continuation of a reply (the reply given,
-- or a fresh candidate) with its metrics and score. Each is stored when it finishes, so an
-- interrupted `collabllm pairs` resumes where it stopped. `config_sha256` names the settings
-- (samples, window, weights, seed, models, prompts) the rollout belongs to.
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    turn INTEGER NOT NULL,
    candidate_id BIGINT REFERENCES candidates(id),
    sample INTEGER NOT NULL,
    config_sha256 TEXT NOT NULL,
    seed BIGINT NOT NULL,
    conversation_json TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX rollouts_turn ON rollouts (session_id, turn, config_sha256);

ALTER TABLE rewards ADD COLUMN config_sha256 TEXT NOT NULL DEFAULT '';
