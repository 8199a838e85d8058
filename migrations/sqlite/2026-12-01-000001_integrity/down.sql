DROP TABLE api_keys;
DROP TABLE audit_events;
ALTER TABLE researchers DROP COLUMN sessions_valid_after;
ALTER TABLE sessions DROP COLUMN handover_allowed;
ALTER TABLE sessions DROP COLUMN resume_proof_hmac;
