-- Reference tables the pipelines join with. Their rows are uploaded with
-- PUT /v1/reference/{table} (CSV or JSON); these declarations give their columns to `fleetlake check`.

CREATE REFERENCE TABLE reference.devices (
    device_id VARCHAR NOT NULL,
    tenant    VARCHAR,
    site      VARCHAR,
    model     VARCHAR,
    hw_rev    VARCHAR
);
