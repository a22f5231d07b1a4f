//! Hangar's orchestrator core (no HTTP): a fleet of hosts, placement that never
//! oversubscribes, and survival of host failures.
//!
//! * [`registry`]: hosts in the store, credentials sealed with AES-256-GCM, single-use
//!   enrollment tokens.
//! * [`health`]: the per-host health state machine (heartbeats, checks, silence).
//! * [`placement`]: filters, scoring and the "why not" answer; pure logic.
//! * [`reservations`]: the ledger that holds capacity from decision to confirmation, and
//!   the waiting queue.
//! * [`scheduler`]: the shared core that ties them together with a
//!   [`client::HostConnector`], split by concern: the fleet (registration, health ticks
//!   and checks, event-stream followers), admission (placement requests, reservations, the
//!   queue) and the VM lifecycle (create, power, delete, TTL extension, the reaper).
//! * [`facade`]: [`HttpOrchestrator`], the running service and the only way in for the
//!   API (private fields; it owns the scheduler, the connector, the tunnels, its jobs and
//!   its background work): hosts, enrollment tokens, resource overviews, tunnels.
//! * [`service`]: the facade's VM work: every operation takes the caller, decides access
//!   with the host's own rule, audits, and forwards the same `VmCall`.
//! * [`pools`]: runner pools in the store; the warm-pool work is the scheduler's
//!   `pools` concern (fill, recycle, claim, eviction).
//! * [`fake`]: an in-memory host for tests and benchmarks.
//!
//! The HTTP routes, the HTTP [`client::HostClient`] and the agent side live elsewhere.

pub mod client;
pub mod clock;
pub mod error;
pub mod facade;
pub mod fake;
pub mod health;
pub mod http_client;
pub mod model;
pub mod placement;
pub mod pools;
pub mod registry;
pub mod reservations;
pub mod scheduler;
pub mod sealer;
pub mod service;
pub mod tunnel;

pub use client::{HostClient, HostClientError, HostConnector, HostCreateVm, HostEvent, VmOp};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{OrchestratorError, Result};
pub use facade::HttpOrchestrator;
pub use health::{HealthConfig, HostHealth, Observation, Transition};
pub use http_client::{HttpConnector, HttpHostClient};
pub use model::*;
pub use placement::{Caller, Decision, NoCapacity, PlacementRequest, Profile, Reason};
pub use registry::{EnrollmentToken, HostRegistry, IssuedToken};
pub use reservations::{Reservation, Reservations};
pub use scheduler::{
    AsWritten, BackgroundIntervals, CAPACITY, CreateVm, ImageVersions, Leadership, PoolPass, ReapReport, Scheduler,
    SchedulerConfig,
};
