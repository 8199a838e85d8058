DROP TABLE synth_turns;
