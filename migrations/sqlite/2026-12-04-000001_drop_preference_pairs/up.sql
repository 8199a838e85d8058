-- Pairs are written to JSONL files by the exports and by `pairs`; this table was never filled.
DROP TABLE preference_pairs;
