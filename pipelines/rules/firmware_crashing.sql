-- Alert rule, managed over HTTP too (PUT/DELETE /v1/rules/{name} rewrites this file): one
-- CREATE RULE per file, named like the file. Each transition (firing, resolved) is published to
-- alerts.<rule>.<key> on NATS and recorded in final.alerts (see pipelines/README.md, "Rules").

-- A tenant's firmware cohort is crashing: in an hour, more than 2% of its health reports are crashes (four
-- times the fleet's usual 0.5%) over at least 50 reports. A rate, not a count: a count grows with
-- the fleet and the hour's traffic, and then fires for every firmware. (Rules see rows;
-- aggregation belongs to window tables, here final.firmware_hour.)
CREATE RULE firmware_crashing
WITH (severity = 'warning', key = 'tenant, fw', event_time = 'window_end')
AS SELECT
    tenant,
    fw,
    window_start,
    window_end,
    crashes,
    reports,
    devices,
    reports >= 50 AND CAST(crashes AS DOUBLE) / reports > 0.02 AS firing
FROM final.firmware_hour;
