//! Identity. On AWS, API Gateway's JWT authorizer has already verified the token and the
//! handlers only read its claims from the request context. The local runner verifies an HS256
//! token itself and places the same claims in the same place, so handlers cannot tell the two
//! apart.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use lambda_http::http;
use lambda_http::{
    aws_lambda_events::apigw::{
        ApiGatewayRequestAuthorizer, ApiGatewayRequestAuthorizerJwtDescription,
        ApiGatewayV2httpRequestContext,
    },
    request::RequestContext,
    Request, RequestExt,
};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::model::Identity;

/// Reads the caller from the authorizer's claims. `None` when the request carries none.
pub fn identity(req: &Request) -> Option<Identity> {
    let RequestContext::ApiGatewayV2(ctx) = req.request_context_ref()? else {
        return None;
    };
    let claims = &ctx.authorizer.as_ref()?.jwt.as_ref()?.claims;
    let user_id = claims
        .get("sub")
        .filter(|s| !s.is_empty() && s.len() <= 255)?
        .clone();
    let tenant_id = claims
        .get("tenant_id")
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .cloned();
    Some(Identity { user_id, tenant_id })
}

/// The claims the service reads from a token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or a list of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("the token names no key this service knows")]
    UnknownKey,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("could not fetch the signing keys")]
    Jwks(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Asymmetric algorithms a JWKS may sign with. Never `none`, never HMAC: a public key must not
/// be usable as an HMAC secret.
const JWKS_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// A JWKS is fetched again for an unknown `kid` (keys rotate) at most this often.
const JWKS_REFETCH: Duration = Duration::from_secs(30);

enum Keys {
    Secret {
        decoding: DecodingKey,
        encoding: EncodingKey,
    },
    Jwks {
        url: String,
        http: reqwest::Client,
        cache: RwLock<(JwkSet, Option<Instant>)>,
    },
}

/// Token verification for the local runner, as the deployment is configured: HS256 with
/// `JWT_SECRET`, or RS256/ES256 keys from a JWKS URL; with `JWT_ISSUER` and `JWT_AUDIENCE`
/// checked when set. On AWS, API Gateway's JWT authorizer does the same job.
pub struct LocalVerifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<Vec<String>>,
}

impl LocalVerifier {
    /// HS256 with a shared secret.
    pub fn new(secret: &[u8]) -> Result<Self, jsonwebtoken::errors::Error> {
        Ok(Self {
            keys: Keys::Secret {
                decoding: DecodingKey::from_secret(secret)?,
                encoding: EncodingKey::from_secret(secret)?,
            },
            issuer: None,
            audience: None,
        })
    }

    /// Keys from a JWKS URL, fetched on first use and again when a token names a new key.
    pub fn jwks(url: impl Into<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a reqwest client with static settings builds");
        Self {
            keys: Keys::Jwks {
                url: url.into(),
                http,
                cache: RwLock::new((JwkSet { keys: Vec::new() }, None)),
            },
            issuer: None,
            audience: None,
        }
    }

    /// Requires `iss` and `aud` claims with these values.
    pub fn expecting(mut self, issuer: Option<String>, audience: Option<Vec<String>>) -> Self {
        self.issuer = issuer;
        self.audience = audience.filter(|a| !a.is_empty());
        self
    }

    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    pub fn audience(&self) -> Option<&[String]> {
        self.audience.as_deref()
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(audience);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation
    }

    async fn key_for(&self, header: &Header) -> Result<(DecodingKey, Algorithm), AuthError> {
        match &self.keys {
            Keys::Secret { decoding, .. } => Ok((decoding.clone(), Algorithm::HS256)),
            Keys::Jwks { url, http, cache } => {
                if !JWKS_ALGORITHMS.contains(&header.alg) {
                    return Err(AuthError::Algorithm);
                }
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                if let Some(jwk) = cache.read().await.0.find(kid) {
                    return Ok((DecodingKey::from_jwk(jwk)?, header.alg));
                }
                let mut cached = cache.write().await;
                if let Some(jwk) = cached.0.find(kid) {
                    return Ok((DecodingKey::from_jwk(jwk)?, header.alg));
                }
                if cached.1.is_some_and(|at| at.elapsed() < JWKS_REFETCH) {
                    return Err(AuthError::UnknownKey);
                }
                let set: JwkSet =
                    async { http.get(url).send().await?.error_for_status()?.json().await }
                        .await
                        .map_err(|e: reqwest::Error| AuthError::Jwks(Box::new(e)))?;
                *cached = (set, Some(Instant::now()));
                let jwk = cached.0.find(kid).ok_or(AuthError::UnknownKey)?;
                Ok((DecodingKey::from_jwk(jwk)?, header.alg))
            }
        }
    }

    /// Verifies `Authorization: Bearer <jwt>` and returns the request with the token's claims in
    /// its API Gateway v2 request context, exactly where the JWT authorizer puts them.
    pub async fn authorize(&self, req: Request) -> Result<Request, AuthError> {
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        // The header is only read to pick the key; the algorithm is then pinned by the key.
        let header = jsonwebtoken::decode_header(token)?;
        let (key, algorithm) = self.key_for(&header).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation(algorithm))?;
        let mut claims = HashMap::from([("sub".to_owned(), data.claims.sub)]);
        if let Some(tenant) = data.claims.tenant_id {
            claims.insert("tenant_id".to_owned(), tenant);
        }
        let mut jwt = ApiGatewayRequestAuthorizerJwtDescription::default();
        jwt.claims = claims;
        let mut authorizer = ApiGatewayRequestAuthorizer::default();
        authorizer.jwt = Some(jwt);
        let mut ctx = match req.request_context_ref() {
            Some(RequestContext::ApiGatewayV2(ctx)) => ctx.clone(),
            _ => ApiGatewayV2httpRequestContext::default(),
        };
        ctx.authorizer = Some(authorizer);
        Ok(req.with_request_context(RequestContext::ApiGatewayV2(ctx)))
    }

    /// Signs a token (HS256 verifiers only: a JWKS verifier holds no private key).
    pub fn issue(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        match &self.keys {
            Keys::Secret { encoding, .. } => {
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, encoding)
            }
            Keys::Jwks { .. } => Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lambda_http::http;

    fn request(auth: Option<&str>) -> Request {
        let mut builder = http::Request::builder().uri("/api/health");
        if let Some(a) = auth {
            builder = builder.header("authorization", a);
        }
        builder.body(lambda_http::Body::Empty).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "user-a".into(),
            tenant_id: Some("tenant-x".into()),
            exp,
            ..Claims::default()
        }
    }

    #[tokio::test]
    async fn a_valid_token_becomes_the_same_identity_the_api_gateway_authorizer_gives() {
        let verifier = LocalVerifier::new(b"secret").unwrap();
        let token = verifier.issue(&claims(now() + 60)).unwrap();
        let req = verifier
            .authorize(request(Some(&format!("Bearer {token}"))))
            .await
            .unwrap();
        assert_eq!(
            identity(&req),
            Some(Identity {
                user_id: "user-a".into(),
                tenant_id: Some("tenant-x".into())
            })
        );
    }

    #[tokio::test]
    async fn expired_missing_and_wrongly_signed_tokens_are_refused() {
        let verifier = LocalVerifier::new(b"secret").unwrap();
        let expired = verifier.issue(&claims(now() - 600)).unwrap();
        assert!(verifier
            .authorize(request(Some(&format!("Bearer {expired}"))))
            .await
            .is_err());
        assert!(matches!(
            verifier.authorize(request(None)).await,
            Err(AuthError::Missing)
        ));
        let forged = LocalVerifier::new(b"other")
            .unwrap()
            .issue(&claims(now() + 60))
            .unwrap();
        assert!(verifier
            .authorize(request(Some(&format!("Bearer {forged}"))))
            .await
            .is_err());
    }

    #[test]
    fn a_request_without_authorizer_claims_has_no_identity() {
        assert_eq!(identity(&request(None)), None);
    }
}
