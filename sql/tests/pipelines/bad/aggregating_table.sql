-- expect: 7:24 usable.x: a streaming table keeps one row per reading, so its query cannot use GROUP BY or HAVING
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x AS SELECT device_id, count(*) AS n FROM readings GROUP BY device_id;
