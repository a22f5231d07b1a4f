//! The OpenAPI 3.1 document: generated from the handlers' annotations, with each
//! operation's access rule and security schemes added from the access table.

use hangar_core::Access;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{InfoBuilder, OpenApi, ServerBuilder};

/// Record an operation's access rule in the document.
pub fn document_access(op: &mut Operation, access: Access) {
    let ext = ExtensionsBuilder::new().add("x-hangar-access", serde_json::to_value(access).unwrap_or_default()).build();
    match op.extensions.as_mut() {
        Some(e) => e.merge(ext),
        None => op.extensions = Some(ext),
    }
    if access == Access::Open {
        op.security = Some(vec![
            SecurityRequirement::default(),
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("api_key", Vec::<String>::new()),
        ]);
    } else if access.is_public() {
        op.security = Some(vec![SecurityRequirement::default()]);
    } else {
        op.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("api_key", Vec::<String>::new()),
        ]);
    }
    let note = format!("Requires {}.", access.describe());
    op.description = Some(match op.description.take() {
        Some(d) if !d.is_empty() => format!("{d}\n\n{note}"),
        _ => note,
    });
}

/// Add the info block, servers, security schemes and shared schemas.
pub fn finish(mut doc: OpenApi) -> OpenApi {
    doc.info = InfoBuilder::new()
        .title("Hangar API")
        .version("1")
        .description(Some(
            "Disposable VMs for CI on Parallels Desktop and QEMU/KVM hosts. Compatible with the v1 API of the Parallels DevOps Service where that API is sound.\n\nEvery error answer has the body `ApiErrorBody`: `{code, error, message, request_id}`.",
        ))
        .license(Some(utoipa::openapi::License::new("Apache-2.0")))
        .build();
    doc.servers = Some(vec![ServerBuilder::new().url("/api/v1").build()]);
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
    );
    components.add_security_scheme(
        "api_key",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description("X-Api-Key", "base64(KEY:SECRET)"))),
    );
    use utoipa::PartialSchema;
    components.schemas.insert("ApiErrorBody".into(), crate::error::ApiErrorBody::schema());
    // Answers that differ by where a VM route was called (see `crate::mount`), named in
    // the routes' descriptions.
    components.schemas.insert("FleetMachine".into(), hangar_wire::FleetMachine::schema());
    components.schemas.insert("PowerDone".into(), hangar_wire::PowerDone::schema());
    doc
}
