//! Outrider runs AI agents on request and reports back with signed callbacks.
//!
//! The modules, and what each owns:
//!
//! - [`cli`] and [`config`]: subcommands, flags and `OUTRIDER_*` settings.
//! - [`app`]: builds the server from its settings (store, API, workers,
//!   dispatcher) in one place.
//! - [`bootstrap`]: the first start of an empty database: a default
//!   organisation and agent.
//! - [`serve`]: the HTTP accept loop, with header timeouts and a
//!   connection limit.
//! - [`api`]: HTTP routes, authentication, request parsing, JSON errors.
//! - [`store`]: schema, migrations and every query, behind one trait.
//! - [`worker`]: claims sessions with leases and finishes them.
//! - [`runtime`]: the agent loop of model calls and tool calls.
//! - [`providers`]: model back ends (the embedded local model,
//!   OpenAI-compatible, scripted).
//! - [`tools`]: the built-in tools agents may use.
//! - [`delivery`]: the callback outbox, retry policy, URL guard and signing.
//! - [`domain`]: the types all of them share.
//! - [`secrets`]: signing secrets sealed at rest under the operator's key.
//! - [`listen`]: `outrider listen`, a local HTTPS receiver for development.
//!
//! Signatures themselves live in the `outrider-signature` crate, which
//! receivers can embed.

pub mod api;
pub mod app;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod listen;
pub mod providers;
pub mod runtime;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod tools;
pub mod worker;
