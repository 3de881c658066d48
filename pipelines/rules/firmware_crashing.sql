-- Alert rule, managed over HTTP too (PUT/DELETE /v1/rules/{name} rewrites this file): one
-- CREATE RULE per file, named like the file. Each transition (firing, resolved) is published to
-- alerts.<rule>.<key> on NATS and recorded in final.alerts (see pipelines/README.md, "Rules").

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
