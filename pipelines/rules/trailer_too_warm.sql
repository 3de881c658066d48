-- Alert rule, managed over HTTP too (PUT/DELETE /v1/rules/{name} rewrites this file): one
-- CREATE RULE per file, named like the file. Each transition (firing, resolved) is published to
-- alerts.<rule>.<key> on NATS and recorded in final.alerts (see pipelines/README.md, "Rules").

-- A trailer is too warm when it has been above 8 °C for 5 minutes; it is fine again below 6 °C
-- (the 2 °C between is hysteresis: no flapping around one threshold). Not repeated within 30
-- minutes for the same trailer.
CREATE RULE trailer_too_warm
WITH (severity = 'critical', key = 'device_id', for = '5m', cool_down = '30m', event_time = 'ts')
AS SELECT
    device_id,
    ts,
    temperature_c,
    tenant,
    site,
    temperature_c > 8 AS firing,
    temperature_c < 6 AS resolved
FROM usable.cold_chain;
