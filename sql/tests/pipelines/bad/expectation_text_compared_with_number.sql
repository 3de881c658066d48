-- expect: 9:35 state is text (VARCHAR) and is compared with the number
CREATE SOURCE readings (
    device_id VARCHAR NOT NULL,
    seq       BIGINT NOT NULL,
    state     VARCHAR
) WITH (subject = 'telemetry.x.>');

CREATE STREAMING TABLE usable.x (
    CONSTRAINT state_high EXPECT (state > 5) ON VIOLATION WARN
) AS SELECT device_id, seq, state FROM readings;
