//! Per-job callback tokens. A provider calls back on a URL that names the job, its attempt and a
//! token: an HMAC of both under the deployment's callback secret. It is unguessable without the
//! secret, needs nothing stored, and is checked in constant time. A token for an earlier attempt
//! is still authentic but names an attempt that is no longer current, so it changes nothing.

use aws_lc_rs::hmac;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use uuid::Uuid;

use crate::config::Secret;

fn key(secret: &Secret) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes())
}

fn message(job_id: Uuid, attempt: i32) -> String {
    format!("modelslab-callback:{job_id}:{attempt}")
}

pub fn token(secret: &Secret, job_id: Uuid, attempt: i32) -> String {
    URL_SAFE_NO_PAD.encode(hmac::sign(
        &key(secret),
        message(job_id, attempt).as_bytes(),
    ))
}

pub fn verify(secret: &Secret, job_id: Uuid, attempt: i32, token: &str) -> bool {
    let Ok(tag) = URL_SAFE_NO_PAD.decode(token.trim()) else {
        return false;
    };
    hmac::verify(&key(secret), message(job_id, attempt).as_bytes(), &tag).is_ok()
}

/// The callback URL for one attempt of a job. It carries the token, so it is never logged.
pub fn url(base: &str, secret: &Secret, job_id: Uuid, attempt: i32) -> String {
    format!(
        "{base}/api/webhooks/modelslab/{job_id}?attempt={attempt}&token={}",
        token(secret, job_id, attempt)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_only_its_own_job_and_attempt() {
        let secret = Secret::new("a-callback-secret-of-thirty-two-bytes!");
        let job = Uuid::now_v7();
        let t = token(&secret, job, 1);
        assert!(verify(&secret, job, 1, &t));
        assert!(!verify(&secret, job, 2, &t));
        assert!(!verify(&secret, Uuid::now_v7(), 1, &t));
        assert!(!verify(
            &Secret::new("another-secret-another-secret-xx"),
            job,
            1,
            &t
        ));
        assert!(!verify(&secret, job, 1, "not-a-token"));
        assert!(!verify(&secret, job, 1, ""));
    }
}
