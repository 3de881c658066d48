-- The latency benchmarks' pipeline: each reading carries the time it was sent (sent_us,
-- microseconds since the epoch), which reaches usable.latency and every alert's values.
CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE, sent_us BIGINT)
WITH (subject = 'telemetry.>', dedup_key = 'device_id, seq', event_time = 'ts');

CREATE STREAMING TABLE usable.latency AS SELECT device_id, seq, ts, temp_c, sent_us FROM readings;

CREATE RULE hot WITH (severity = 'critical', key = 'device_id')
AS SELECT device_id, ts, sent_us, temp_c > 100 AS firing FROM usable.latency;
