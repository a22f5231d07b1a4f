//! Route handlers, one module per area. Each module has a `register` function that adds
//! its routes to the [`crate::Api`] with their access rules.

pub mod auth;
pub mod cache;
pub mod catalog;
pub mod catalog_managers;
pub mod console;
pub mod dto;
pub mod logs;
pub mod machines;
pub mod metrics;
pub mod orchestrator;
pub mod pools;
pub mod port_forward;
pub mod reverse_proxy;
pub mod runners;
pub mod sso;
pub mod system;
pub mod user_configs;
pub mod ws;
