//! Entry points for the fuzz targets in `infra/fuzz`: every parser that takes input from outside
//! (request bodies, query cursors, webhook URLs, the provider's answers). They call the very
//! functions the handlers call.

use lambda_http::Body;

/// Validates a generate request's body as the enqueue route does; the job params on success.
pub fn job_request(kind: &str, body: &[u8]) -> Result<serde_json::Value, String> {
    crate::api::parse_job_request(kind, &Body::Binary(body.to_vec()))
        .map(|r| r.params)
        .map_err(|e| format!("{} {}", e.status().as_u16(), e.code()))
}

/// Decodes a list cursor as the list route does.
pub fn list_cursor(raw: &str) -> bool {
    crate::api::decode_cursor(raw).is_some()
}

/// Checks a client's webhook URL as enqueue does (no DNS).
pub fn webhook_url(raw: &str) -> Result<String, String> {
    let settings = crate::webhooks::WebhookSettings {
        secret: crate::config::Secret::new("fuzz-secret-fuzz-secret-fuzz"),
        allow_hosts: Vec::new(),
    };
    crate::webhooks::check_url(&settings, raw)
        .map(|u| u.to_string())
        .map_err(|r| r.0)
}

/// Reads a ModelsLab answer (or callback body) as the client does.
pub fn provider_answer(status: u16, body: &[u8]) -> Result<(), String> {
    crate::generator::read_modelslab_answer(status, body).map_err(|e| e.to_string())
}
