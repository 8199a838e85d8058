CREATE TABLE preference_pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    study_id BIGINT NOT NULL REFERENCES studies(id),
    session_id BIGINT REFERENCES sessions(id),
    turn INTEGER NOT NULL,
    source TEXT NOT NULL,
    prompt_json TEXT NOT NULL,
    chosen TEXT NOT NULL,
    rejected TEXT NOT NULL,
    score_chosen DOUBLE PRECISION,
    score_rejected DOUBLE PRECISION,
    metadata_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX preference_pairs_study ON preference_pairs (study_id);
