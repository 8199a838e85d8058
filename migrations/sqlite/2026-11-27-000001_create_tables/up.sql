CREATE TABLE secrets (
    name TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);

CREATE TABLE studies (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',
    created_at TIMESTAMP NOT NULL
);

CREATE TABLE study_versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    study_id BIGINT NOT NULL REFERENCES studies(id),
    version INTEGER NOT NULL,
    label TEXT NOT NULL,
    protocol_text TEXT NOT NULL,
    protocol_sha256 TEXT NOT NULL,
    source_path TEXT NOT NULL,
    imported_at TIMESTAMP NOT NULL,
    UNIQUE (study_id, version)
);

CREATE TABLE arms (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    study_version_id BIGINT NOT NULL REFERENCES study_versions(id),
    name TEXT NOT NULL,
    model_id TEXT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    quota INTEGER,
    policy_json TEXT NOT NULL,
    UNIQUE (study_version_id, name)
);

CREATE TABLE participants (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    study_id BIGINT NOT NULL REFERENCES studies(id),
    pseudonym TEXT NOT NULL UNIQUE,
    external_id_hmac TEXT,
    simulated BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (study_id, external_id_hmac)
);

CREATE TABLE sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    public_id TEXT NOT NULL UNIQUE,
    participant_id BIGINT NOT NULL REFERENCES participants(id),
    study_version_id BIGINT NOT NULL REFERENCES study_versions(id),
    arm_id BIGINT REFERENCES arms(id),
    task_id TEXT,
    topic_id TEXT,
    token_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    completion_code TEXT,
    consent_sha256 TEXT,
    consented_at TIMESTAMP,
    started_at TIMESTAMP NOT NULL,
    first_message_at TIMESTAMP,
    finished_at TIMESTAMP,
    last_activity_at TIMESTAMP NOT NULL,
    last_client_seq BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX sessions_participant ON sessions (participant_id);
CREATE INDEX sessions_version_state ON sessions (study_version_id, state);
CREATE INDEX sessions_arm ON sessions (arm_id);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    ttft_ms INTEGER,
    gen_ms INTEGER,
    prompt_tokens INTEGER,
    gen_tokens INTEGER,
    finish_reason TEXT,
    policy_json TEXT,
    UNIQUE (session_id, seq)
);

CREATE TABLE candidates (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    after_seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    content TEXT NOT NULL,
    chosen BOOLEAN,
    policy_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX candidates_session ON candidates (session_id, after_seq);

CREATE TABLE document_revisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    rev INTEGER NOT NULL,
    author TEXT NOT NULL,
    message_seq INTEGER,
    content TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (session_id, rev)
);

CREATE TABLE ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    after_turn INTEGER NOT NULL,
    rating_key TEXT NOT NULL,
    value INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (session_id, rating_key, after_turn)
);

CREATE TABLE questionnaire_answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    question_key TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (session_id, question_key)
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    client_seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (session_id, client_seq)
);

CREATE TABLE assignments (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    study_version_id BIGINT NOT NULL REFERENCES study_versions(id),
    participant_id BIGINT NOT NULL REFERENCES participants(id),
    draw_index INTEGER NOT NULL,
    method TEXT NOT NULL,
    arm_id BIGINT NOT NULL REFERENCES arms(id),
    task_id TEXT NOT NULL,
    topic_id TEXT NOT NULL,
    inputs_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (study_version_id, draw_index)
);
CREATE INDEX assignments_participant ON assignments (participant_id);

CREATE TABLE rewards (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id),
    turn INTEGER NOT NULL,
    candidate_id BIGINT REFERENCES candidates(id),
    mr DOUBLE PRECISION NOT NULL,
    mr_std DOUBLE PRECISION NOT NULL,
    components_json TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX rewards_session ON rewards (session_id, turn);

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
