//! Integration tests: the real `keygate` binary and the real server on port 0, each with a
//! fresh data directory.

mod browser;
mod foundation;
#[allow(dead_code)] // each test module uses a part of the helpers
mod helpers;
mod jobs;
mod openapi;
mod operations;
mod portal;
mod protocol;
mod sdk;
mod usage;
