-- expect: 5:39 event_time column seq is Int64, expected TIMESTAMP
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL
) WITH (subject = 'a.>', event_time = 'seq');

CREATE STREAMING TABLE usable.x AS SELECT device_id FROM readings;
