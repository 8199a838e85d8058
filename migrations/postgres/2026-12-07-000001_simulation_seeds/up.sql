-- A simulated participant's seed: its replies are sampled with seeds drawn from it, so a pilot or
-- the online loop runs the same twice, and its turns are named by it in the seeds that score them.
ALTER TABLE sessions ADD COLUMN simulation_seed BIGINT;
