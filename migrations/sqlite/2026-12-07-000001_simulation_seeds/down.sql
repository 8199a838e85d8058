ALTER TABLE sessions DROP COLUMN simulation_seed;
