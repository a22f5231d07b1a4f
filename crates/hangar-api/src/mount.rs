//! One handler, several places: a VM route is written once, for the host path
//! (`/machines/{id}/...`), and mounted also through the orchestrator, across the fleet
//! (`/orchestrator/machines/{id}/...`) and on one named host
//! (`/orchestrator/hosts/{id}/machines/{vm_id}/...`: there `{id}` is the host, as on every
//! `/orchestrator/hosts/{id}` route, and the VM is `{vm_id}`). Each place's router carries a
//! [`Mounted`] extension saying which place it is, and the handler reads it through the
//! [`At`] extractor (never from the path's text); the access rule is declared once, from
//! [`hangar_core::VmAction::access`].

use axum::Extension;
use axum::extract::{FromRequestParts, RawPathParams};
use http::request::Parts;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn, Paths};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{PathItem, RefOr, Required};
use utoipa_axum::router::UtoipaMethodRouter;

use crate::error::ApiError;
use crate::{Api, AppState};

/// Where a mounted route was called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    /// On this host's own module.
    Local,
    /// Through the orchestrator: anywhere in the fleet, or on the named host (id or name).
    Fleet(Option<String>),
}

impl Where {
    pub fn host(&self) -> Option<&str> {
        match self {
            Where::Fleet(h) => h.as_deref(),
            Where::Local => None,
        }
    }
}

/// The call's place and its path parameters (percent-decoded).
#[derive(Debug, Clone)]
pub struct At {
    pub place: Where,
    per_host: bool,
    params: Vec<(String, String)>,
}

impl At {
    /// A path parameter; a mounted route's own parameters are always there.
    pub fn param(&self, name: &str) -> Result<&str, ApiError> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| ApiError::internal(format!("path parameter {name} missing")))
    }

    /// The VM id or name of the route.
    pub fn vm(&self) -> Result<&str, ApiError> {
        self.param(if self.per_host { "vm_id" } else { "id" })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for At {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // A route added without a place is the host's own.
        let Mounted { fleet, per_host } = parts.extensions.get::<Mounted>().copied().unwrap_or(Mounted::HOST);
        let raw = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("Bad path parameter: {}", e.body_text())))?;
        let params: Vec<(String, String)> = raw.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let host = if per_host { params.iter().find(|(k, _)| k == "id").map(|(_, v)| v.clone()) } else { None };
        Ok(At { place: if fleet { Where::Fleet(host) } else { Where::Local }, per_host, params })
    }
}

/// Which place a router serves; set as a request extension by [`Api::add_at`] and
/// [`Api::add_with_host`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mounted {
    fleet: bool,
    per_host: bool,
}

impl Mounted {
    const HOST: Mounted = Mounted { fleet: false, per_host: false };
    const FLEET: Mounted = Mounted { fleet: true, per_host: false };
    const PER_HOST: Mounted = Mounted { fleet: true, per_host: true };

    /// The path of this place for a route written at `path` (a host path, or an
    /// `/orchestrator` one).
    fn path(self, path: &str) -> String {
        let rest = path.strip_prefix("/orchestrator").unwrap_or(path);
        match self {
            Mounted { per_host: true, .. } => format!("/orchestrator/hosts/{{id}}{}", rest.replace("{id}", "{vm_id}")),
            Mounted { fleet: true, .. } => format!("/orchestrator{rest}"),
            _ => path.to_string(),
        }
    }
}

/// Which places a route is mounted at besides its own path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Places {
    /// `/orchestrator` + path.
    Fleet,
    /// `/orchestrator` + path and `/orchestrator/hosts/{id}` + path (with the VM's `{id}`
    /// renamed `{vm_id}`).
    FleetAndHosts,
    /// `/orchestrator/hosts/{id}` + path only: a host's own resource (its cache, its
    /// reverse proxy), which has no fleet-wide form. Such a route names no `{id}` of its own.
    Hosts,
}

fn for_fleet(op: &Operation, per_host: bool, of_vm: bool) -> Operation {
    let mut op = op.clone();
    op.tags = Some(vec!["orchestrator".into()]);
    let prefix = if per_host { "host_" } else { "fleet_" };
    op.operation_id = op.operation_id.take().map(|id| format!("{prefix}{id}"));
    if per_host {
        for p in op.parameters.iter_mut().flatten() {
            if let RefOr::T(p) = p
                && p.name == "id"
                && p.parameter_in == ParameterIn::Path
            {
                p.name = "vm_id".into();
            }
        }
        let host = ParameterBuilder::new()
            .name("id")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .description(Some("Host id or name"))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .build();
        op.parameters.get_or_insert_with(Vec::new).insert(0, RefOr::T(host));
    }
    let note = if per_host && !of_vm {
        "Through the orchestrator, on the named host (the caller must be allowed on that host)."
    } else if per_host {
        "Through the orchestrator, on the named host (a VM on another host is a 404)."
    } else {
        "Through the orchestrator, on whichever host runs the VM."
    };
    op.summary = Some(match op.summary.take() {
        Some(s) => format!("{s} {note}"),
        None => note.to_string(),
    });
    op
}

/// `of_vm`: the route names a VM (`{id}` on its own path).
fn fleet_item(item: &PathItem, per_host: bool, of_vm: bool) -> PathItem {
    let mut out = item.clone();
    for op in [&mut out.get, &mut out.put, &mut out.post, &mut out.delete, &mut out.patch, &mut out.head]
        .into_iter()
        .flatten()
    {
        *op = for_fleet(op, per_host, of_vm);
    }
    out
}

impl Api {
    /// Add a route at its own (host) path and at `places` through the orchestrator, one
    /// handler for all, with one access rule.
    pub fn add_at(self, access: hangar_core::Access, places: Places, routes: UtoipaMethodRouter<AppState>) -> Self {
        let extra: &[Mounted] = match places {
            Places::Fleet => &[Mounted::FLEET],
            Places::FleetAndHosts => &[Mounted::FLEET, Mounted::PER_HOST],
            Places::Hosts => &[Mounted::PER_HOST],
        };
        self.add_mounted(access, routes, Mounted::HOST, extra)
    }

    /// Add an orchestrator route (`/orchestrator/...`) and the same on one named host
    /// (`/orchestrator/hosts/{id}/...`), one handler for both.
    pub fn add_with_host(self, access: hangar_core::Access, routes: UtoipaMethodRouter<AppState>) -> Self {
        self.add_mounted(access, routes, Mounted::FLEET, &[Mounted::PER_HOST])
    }

    /// The route at its own paths as `own`, and again at each of `extra`, each router
    /// telling its handler which place it serves.
    fn add_mounted(
        self,
        access: hangar_core::Access,
        (schemas, paths, method_router): UtoipaMethodRouter<AppState>,
        own: Mounted,
        extra: &[Mounted],
    ) -> Self {
        let mut api = self.add(access, (schemas, paths.clone(), method_router.clone().layer(Extension(own))));
        for place in extra {
            let mut moved = Paths::new();
            for (path, item) in &paths.paths {
                moved.paths.insert(place.path(path), fleet_item(item, place.per_host, path.contains("{id}")));
            }
            api = api.add(access, (Vec::new(), moved, method_router.clone().layer(Extension(*place))));
        }
        api
    }
}
