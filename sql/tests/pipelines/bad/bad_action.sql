-- expect: 8:71 expected WARN, DROP, QUARANTINE or FAIL after ON VIOLATION, found IGNORE
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x (
    CONSTRAINT has_device EXPECT (device_id IS NOT NULL) ON VIOLATION IGNORE
) AS SELECT device_id FROM readings;
