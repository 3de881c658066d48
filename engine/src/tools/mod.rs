//! Tools around the engine, not part of it: the seeded fleet simulator ([`simulate`]), a local
//! `nats-server` as a child process ([`nats_server`]), and the one-command demo ([`demo`]) that
//! wires them to the engine. They may call the engine's public API ([`crate::serve`],
//! [`crate::ingest::source`]); the engine never calls them.

pub mod demo;
pub mod nats_server;
pub mod simulate;
