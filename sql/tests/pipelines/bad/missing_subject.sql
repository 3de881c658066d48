-- expect: 2:15 source readings has no subject
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL
) WITH (format = 'json');

CREATE STREAMING TABLE usable.x AS SELECT device_id FROM readings;
