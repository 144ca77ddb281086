DROP TABLE treaty_faults;
