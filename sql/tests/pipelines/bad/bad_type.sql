-- expect: 4:14 unsupported type
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    location GEOMETRY
) WITH (subject = 'telemetry.x.>');
