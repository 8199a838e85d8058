-- Evaluations of a study's arms with simulated users (`collabllm eval`): the table of every arm's
-- metrics and paired differences, and what it was computed with. The console shows the latest.
CREATE TABLE evaluations (
    id BIGSERIAL PRIMARY KEY,
    study_id BIGINT NOT NULL REFERENCES studies(id),
    users INTEGER NOT NULL,
    table_json TEXT NOT NULL,
    provenance_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX evaluations_study ON evaluations (study_id, created_at);
