-- expect: 8:23 table 'datafusion.public.readngs' not found
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x AS
SELECT device_id FROM readngs;
