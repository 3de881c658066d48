-- expect: 10:34 expectation plausible must be a boolean condition, but it is Float64
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL,
    temp      DOUBLE
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x (
    CONSTRAINT has_device EXPECT (device_id IS NOT NULL) ON VIOLATION DROP,
    CONSTRAINT plausible EXPECT (temp * 2) ON VIOLATION QUARANTINE
) AS SELECT device_id, seq, temp FROM readings;
