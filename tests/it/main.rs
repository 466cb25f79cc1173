//! The one integration-test binary: every test starts the real `sundial` server on an ephemeral
//! loopback port and talks to it as a client would.

mod alerts;
mod auth;
mod compaction;
mod durability;
mod harness;
mod pg;
mod query;
mod retention;
mod s3;
mod slt;
mod statements;
mod tidy;
mod views;
mod write;
