-- expect: 2:56 rule quiet: group_min applies to cohort grouping; say which columns name a cohort: group_by = 'site'
CREATE RULE quiet WITH (key = 'device_id', group_min = 20)
AS SELECT device_id, ts, 60 AS silent_after_s FROM usable.telemetry;
