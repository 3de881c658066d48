-- expect: 7:24 a streaming table "final.x" must be a table of the usable zone
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE final.x AS SELECT device_id FROM readings;
