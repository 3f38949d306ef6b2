//! keygate: an on-premises license appliance. Devices in a LAN without internet authorize
//! against license files the vendor signed for this appliance.
//!
//! The binary is a thin shell over this library; tests start the real server through
//! [`server::serve`] on port 0 with a clock they control.

pub mod alerts;
pub mod appliance;
pub mod body_rate;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connections;
pub mod error;
pub mod head_deadline;
pub mod jobs;
pub mod licensing;
pub mod metrics;
pub mod portal;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod tls;
pub mod vendor;
#[cfg(windows)]
pub mod windows;

pub use server::{AppState, serve};
