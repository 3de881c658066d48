-- expect: 10:8 No field named r.tempc. Did you mean 'r.temp'?
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL,
    ts        TIMESTAMP,
    temp      DOUBLE
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x AS
SELECT r.tempc AS temperature FROM readings r;
