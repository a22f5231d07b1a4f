//! Error types.

/// A configuration that cannot be applied. Nothing is changed when [`crate::ProxyManager::apply`]
/// returns one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field has a value the engine cannot use; the message names the host or route.
    #[error("{0}")]
    Invalid(String),
    /// A route's `pattern` is not a valid regex.
    #[error("host {host:?}, route {route:?}: pattern {pattern:?} does not compile: {source}")]
    Regex {
        /// Host key.
        host: String,
        /// Route id.
        route: String,
        /// The pattern as given.
        pattern: String,
        /// The regex compiler's complaint.
        #[source]
        source: regex::Error,
    },
    /// Two hosts would bind the same address.
    #[error("hosts {first:?} and {second:?} both listen on {addr}")]
    AddressConflict {
        /// First host key.
        first: String,
        /// Second host key.
        second: String,
        /// The contested address.
        addr: String,
    },
    /// The listener's certificate or key cannot be used.
    #[error("host {host:?}: TLS: {message}")]
    Tls {
        /// Host key.
        host: String,
        /// What is wrong, with the file name when one was given.
        message: String,
    },
}

/// Errors of the proxy engine itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration was refused (nothing changed).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS client configuration for `https` targets could not be built.
    #[error("TLS client setup for https targets failed: {0}")]
    UpstreamTls(String),
    /// The dedicated I/O threads could not be started.
    #[error("cannot start the proxy's I/O threads: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Why a VM id could not be turned into an address. Produced by [`crate::TargetResolver`]
/// implementations; shown to HTTP clients in the 502 body and in events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No such VM.
    #[error("VM {0:?} is unknown")]
    UnknownVm(String),
    /// The VM exists but has no address (not running, no guest tools, no lease yet).
    #[error("VM {0:?} has no IP address (is it running?)")]
    NoAddress(String),
    /// Any other failure.
    #[error("{0}")]
    Other(String),
}
