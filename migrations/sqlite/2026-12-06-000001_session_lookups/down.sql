DROP INDEX sessions_state_activity;
DROP INDEX sessions_token_hash;
