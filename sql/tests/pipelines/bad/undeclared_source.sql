-- expect: 8:23 the query reads FROM readngs, but the pipeline's source is readings
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x AS
SELECT device_id FROM readngs;
