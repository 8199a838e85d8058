ALTER TABLE rewards DROP COLUMN config_sha256;
DROP TABLE rollouts;
