-- Alert rules. Each transition (firing, resolved) is published to alerts.<rule>.<key> on NATS and
-- recorded in final.alerts (see pipelines/README.md, "Rules").

-- A trailer is too warm when it has been above 8 °C for 5 minutes; it is fine again below 6 °C
-- (the 2 °C between is hysteresis: no flapping around one threshold). Not repeated within 30
-- minutes for the same trailer.
CREATE RULE trailer_too_warm
WITH (severity = 'critical', key = 'device_id', for = '5m', cool_down = '30m', event_time = 'ts')
AS SELECT
    device_id,
    ts,
    temperature_c,
    site,
    temperature_c > 8 AS firing,
    temperature_c < 6 AS resolved
FROM usable.cold_chain;

-- A firmware cohort is crashing: more than 5 crashes in an hour on one firmware. (Rules see
-- rows; aggregation belongs to window tables, here final.firmware_hour.)
CREATE RULE firmware_crashing
WITH (severity = 'warning', key = 'fw', event_time = 'window_end')
AS SELECT
    fw,
    window_start,
    window_end,
    crashes,
    devices,
    crashes > 5 AS firing
FROM final.firmware_hour;
