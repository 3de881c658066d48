-- expect: 2:24 missing source
CREATE STREAMING TABLE usable.x AS SELECT device_id FROM readings;
