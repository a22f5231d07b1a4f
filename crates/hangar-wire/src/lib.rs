//! The contract between Hangar's processes: the request and answer bodies that the API
//! serves, the orchestrator's host client sends and reads, and the CLI prints. One type
//! per body, used on both sides, so the two ends cannot drift.
//!
//! The reference service's JSON shapes live here and only here: its key names
//! (`ID`, `Hardware.memory.size`, ...), sizes printed as `"2048Mb"` ([`Mb`]), numbers that
//! clients send as strings ([`Flexible`]). Every type round-trips (tested below and in
//! each module). No HTTP framework: this crate is serde and utoipa schemas only.

pub mod auth;
pub mod cache;
pub mod calls;
pub mod events;
pub mod machines;
pub mod orchestrator;
pub mod pools;
pub mod units;

pub use auth::{ApiErrorBody, LoginRequest, Probe, TokenResponse};
pub use cache::{CacheCall, CatalogCacheList};
pub use calls::{HttpCall, VmCall, VmReply};
/// The power operations a [`VmCall::Power`] names, so callers build calls without the driver crate.
pub use hangar_hypervisor::PowerOp;
pub use machines::*;
pub use orchestrator::*;
pub use pools::{PoolClaim, PoolImage, RunnerPool, RunnerPoolStatus, RunnerPoolView};
pub use units::{Flexible, Mb};
