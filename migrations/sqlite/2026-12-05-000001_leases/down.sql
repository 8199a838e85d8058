ALTER TABLE sessions DROP COLUMN owner_epoch;
DROP TABLE leases;
