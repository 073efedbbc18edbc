//! Shared helpers for the integration tests.
//!
//! Each test binary uses only part of these helpers, so unused items are allowed.
#![allow(dead_code)]

pub mod model;
pub mod receiver;
pub mod server;
