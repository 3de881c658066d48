-- expect: 7:5 unknown option dedup_windw for CREATE SOURCE: expected one of subject, format, dedup_key, dedup_window, event_time
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL
) WITH (
    subject = 'telemetry.x.>',
    dedup_windw = '1h'
);

CREATE STREAMING TABLE usable.x AS SELECT device_id, seq FROM readings;
