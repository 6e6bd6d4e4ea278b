//! Identity. On AWS, API Gateway's JWT authorizer has already verified the token and the
//! handlers only read its claims from the request context. The local runner verifies an HS256
//! token itself and places the same claims in the same place, so handlers cannot tell the two
//! apart.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// HS256 verification for the local runner.
pub struct LocalVerifier {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl LocalVerifier {
    pub fn new(secret: &[u8]) -> Result<Self, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Ok(Self {
            decoding: DecodingKey::from_secret(secret)?,
            encoding: EncodingKey::from_secret(secret)?,
            validation,
        })
    }

    /// Verifies `Authorization: Bearer <jwt>` and returns the request with the token's claims in
    /// its API Gateway v2 request context, exactly where the JWT authorizer puts them.
    pub fn authorize(&self, req: Request) -> Result<Request, AuthError> {
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
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
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

    pub fn issue(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
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
            iat: None,
        }
    }

    #[test]
    fn a_valid_token_becomes_the_same_identity_the_api_gateway_authorizer_gives() {
        let verifier = LocalVerifier::new(b"secret").unwrap();
        let token = verifier.issue(&claims(now() + 60)).unwrap();
        let req = verifier
            .authorize(request(Some(&format!("Bearer {token}"))))
            .unwrap();
        assert_eq!(
            identity(&req),
            Some(Identity {
                user_id: "user-a".into(),
                tenant_id: Some("tenant-x".into())
            })
        );
    }

    #[test]
    fn expired_missing_and_wrongly_signed_tokens_are_refused() {
        let verifier = LocalVerifier::new(b"secret").unwrap();
        let expired = verifier.issue(&claims(now() - 600)).unwrap();
        assert!(verifier
            .authorize(request(Some(&format!("Bearer {expired}"))))
            .is_err());
        assert!(matches!(
            verifier.authorize(request(None)),
            Err(AuthError::Missing)
        ));
        let forged = LocalVerifier::new(b"other")
            .unwrap()
            .issue(&claims(now() + 60))
            .unwrap();
        assert!(verifier
            .authorize(request(Some(&format!("Bearer {forged}"))))
            .is_err());
    }

    #[test]
    fn a_request_without_authorizer_claims_has_no_identity() {
        assert_eq!(identity(&request(None)), None);
    }
}
