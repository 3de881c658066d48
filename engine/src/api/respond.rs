//! The API's error answers: `{"error":{"code","message"}}` with a status, for every refusal.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetlake_sql::ErrorKind;
use serde_json::json;

use crate::api::auth::Denied;

/// A refusal in the API's error shape, with `WWW-Authenticate` on a 401 and `Retry-After` on
/// a 429.
pub(crate) fn denied(d: Denied) -> Response {
    let mut response = error_response(d.status, d.code, &d.message);
    if d.status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"fleetlake\""),
        );
    }
    if let Some(after) = d.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(after));
    }
    response
}

/// The request's JSON body, or a 400 `bad_request` saying what was `expected`.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    expected: &str,
) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("expected a JSON body {expected}: {e}"),
        ))
    })
}

/// `{"error":{"code":…,"message":…}}` with a status.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": {"code": code, "message": message}}).to_string(),
    )
        .into_response()
}

pub(crate) fn sql_error(e: &fleetlake_sql::Error) -> Response {
    let status = match e.kind() {
        ErrorKind::User => StatusCode::BAD_REQUEST,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Limit => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, e.code(), &e.to_string())
}
