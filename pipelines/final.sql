-- The final zone: window tables over the usable tables of cold_chain.sql and device_health.sql.
-- Each row is written once, when the watermark closes its window (see pipelines/README.md,
-- "Windows"). Every table carries the tenant of its rows (from reference.devices), so a token
-- bound to a tenant reads its own rows of each (NULL for a device the registry does not know).

-- Per trailer and minute: count, min, max, avg and last of each metric.
CREATE WINDOW TABLE final.device_minute
WITH (window = 'tumbling', size = '1m', watermark = '30s', allowed_lateness = '1m', event_time = 'ts')
AS SELECT
    window_start,
    window_end,
    device_id,
    tenant,
    count(*)                                AS readings,
    min(temperature_c)                      AS temperature_min,
    max(temperature_c)                      AS temperature_max,
    avg(temperature_c)                      AS temperature_avg,
    last_value(temperature_c ORDER BY ts)   AS temperature_last,
    min(battery)                            AS battery_min,
    last_value(battery ORDER BY ts)         AS battery_last,
    sum(CASE WHEN door_open THEN 1 ELSE 0 END) AS door_open_readings,
    max(ts)                                 AS last_seen
FROM usable.cold_chain
GROUP BY window_start, window_end, device_id, tenant;

-- Per trailer and hour, the same.
CREATE WINDOW TABLE final.device_hour
WITH (window = 'tumbling', size = '1h', watermark = '30s', allowed_lateness = '5m', event_time = 'ts')
AS SELECT
    window_start,
    window_end,
    device_id,
    tenant,
    count(*)                                AS readings,
    min(temperature_c)                      AS temperature_min,
    max(temperature_c)                      AS temperature_max,
    avg(temperature_c)                      AS temperature_avg,
    last_value(temperature_c ORDER BY ts)   AS temperature_last,
    min(battery)                            AS battery_min,
    last_value(battery ORDER BY ts)         AS battery_last,
    -- battery trend: the change over the hour (negative = draining)
    last_value(battery ORDER BY ts) - first_value(battery ORDER BY ts) AS battery_change,
    max(ts)                                 AS last_seen
FROM usable.cold_chain
GROUP BY window_start, window_end, device_id, tenant;

-- Fleet KPIs per hour and cohort (tenant, site, model, hardware revision, firmware).
CREATE WINDOW TABLE final.fleet_hour
WITH (window = 'tumbling', size = '1h', watermark = '30s', allowed_lateness = '5m', event_time = 'ts')
AS SELECT
    window_start,
    window_end,
    tenant,
    site,
    model,
    hw_rev,
    fw,
    count(*)                                            AS readings,
    approx_distinct(device_id)                          AS devices,
    avg(temperature_c)                                  AS temperature_avg,
    sum(CASE WHEN temperature_c > 8 THEN 1 ELSE 0 END)  AS warm_readings,
    sum(CASE WHEN door_open THEN 1 ELSE 0 END)          AS door_open_readings
FROM usable.cold_chain
GROUP BY window_start, window_end, tenant, site, model, hw_rev, fw;

-- Device health per hour: reboots, crashes, load, and when each device was last seen.
CREATE WINDOW TABLE final.device_health_hour
WITH (window = 'tumbling', size = '1h', watermark = '30s', allowed_lateness = '5m', event_time = 'ts')
AS SELECT
    window_start,
    window_end,
    device_id,
    tenant,
    fw,
    count(*)                                        AS reports,
    sum(CASE WHEN rebooted THEN 1 ELSE 0 END)       AS reboots,
    sum(CASE WHEN crashed THEN 1 ELSE 0 END)        AS crashes,
    avg(cpu_pct)                                    AS cpu_avg,
    max(mem_mb)                                     AS mem_max_mb,
    max(ts)                                         AS last_seen
FROM usable.device_health
GROUP BY window_start, window_end, device_id, tenant, fw;

-- Per firmware and hour: how many devices report, reboot and crash.
CREATE WINDOW TABLE final.firmware_hour
WITH (window = 'tumbling', size = '1h', watermark = '30s', allowed_lateness = '5m', event_time = 'ts')
AS SELECT
    window_start,
    window_end,
    tenant,
    fw,
    approx_distinct(device_id)                      AS devices,
    count(*)                                        AS reports,
    sum(CASE WHEN rebooted THEN 1 ELSE 0 END)       AS reboots,
    sum(CASE WHEN crashed THEN 1 ELSE 0 END)        AS crashes
FROM usable.device_health
GROUP BY window_start, window_end, tenant, fw;

-- Silent devices: a session per trailer ends when it has sent nothing for 10 minutes; its row
-- says when it went quiet (last_seen) and for how long it had been reporting.
CREATE WINDOW TABLE final.device_sessions
WITH (window = 'session', gap = '10m', watermark = '30s', allowed_lateness = '0', event_time = 'ts')
AS SELECT
    window_start,
    window_end,
    device_id,
    tenant,
    count(*)    AS readings,
    min(ts)     AS first_seen,
    max(ts)     AS last_seen
FROM usable.cold_chain
GROUP BY window_start, window_end, device_id, tenant;
