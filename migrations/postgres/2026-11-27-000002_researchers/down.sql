DROP TABLE researchers;
