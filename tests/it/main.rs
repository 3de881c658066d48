//! Integration tests against real servers: NATS with JetStream and SeaweedFS's S3 gateway,
//! started by each test on free loopback ports (see the `fleetlake_tests` harness).

mod access;
mod alertmanager;
mod alerts;
mod cluster;
mod concurrency;
mod crash;
mod dedup;
mod demo;
mod devices;
mod end_to_end;
mod field_inputs;
mod fleet;
mod freshness;
mod maintenance;
mod mutations;
mod nats_auth;
mod pipelines;
mod reference;
mod rules_api;
mod silence;
