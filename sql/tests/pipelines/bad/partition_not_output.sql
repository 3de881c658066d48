-- expect: 9:17 partition column event_day is not an output of the query
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL,
    ts        TIMESTAMP
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x
PARTITIONED BY (event_day)
AS SELECT device_id, CAST(ts AS DATE) AS event_date FROM readings;
