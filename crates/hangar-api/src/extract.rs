//! Extractors whose rejections use the API's error shape.

use axum::extract::rejection::{FormRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// JSON body; malformed JSON is 400, a wrong shape or type is 422, a wrong content
/// type is 415, an oversized body is 413 — each with the error body.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(e) => Err(json_rejection(e)),
        }
    }
}

pub fn json_rejection(e: JsonRejection) -> ApiError {
    match &e {
        JsonRejection::JsonDataError(d) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("The JSON body has the wrong shape: {}", d.body_text()),
        ),
        JsonRejection::JsonSyntaxError(d) => {
            ApiError::bad_request(format!("The body is not valid JSON: {}", d.body_text()))
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Send the body as JSON with 'Content-Type: application/json'",
        ),
        JsonRejection::BytesRejection(b) => ApiError::new(b.status(), b.body_text()),
        _ => ApiError::new(e.status(), e.body_text()),
    }
}

/// Path parameters.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e: PathRejection| ApiError::bad_request(format!("Bad path parameter: {}", e.body_text())))
    }
}

/// Query parameters.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(format!("Bad query string: {}", e.body_text())))
    }
}

/// A body accepted as JSON or as `application/x-www-form-urlencoded` (the reference's
/// k6 load tests log in with a form body).
pub struct JsonOrForm<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonOrForm<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if is_form {
            axum::Form::<T>::from_request(req, state).await.map(|f| JsonOrForm(f.0)).map_err(|e: FormRejection| {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("Bad form body: {}", e.body_text()))
            })
        } else {
            Json::<T>::from_request(req, state).await.map(|j| JsonOrForm(j.0))
        }
    }
}
