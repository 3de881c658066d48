-- expect: 2:15 the default dedup_key 'device_id, seq' needs column seq
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    ts        TIMESTAMP
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x AS SELECT device_id FROM readings;
