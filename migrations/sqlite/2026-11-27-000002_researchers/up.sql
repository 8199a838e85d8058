-- Researchers who may use the console; passwords are stored as argon2id PHC strings.
CREATE TABLE researchers (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
