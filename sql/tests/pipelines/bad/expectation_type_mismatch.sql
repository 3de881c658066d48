-- expect: 9:35 in expectation temp_range
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL,
    at        TIMESTAMP
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x (
    CONSTRAINT temp_range EXPECT (at > true) ON VIOLATION WARN
) AS SELECT device_id, seq, at FROM readings;
