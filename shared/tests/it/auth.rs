//! Token verification as the local runner does it: HS256 with a shared secret, or RS256/ES256
//! keys from a JWKS URL (served by wiremock, as an identity provider serves it). Every kind of
//! bad token is refused.

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lambda_http::{http, Body, Request};
use serde_json::{json, Value};
use shared::auth::{identity, AuthError, Claims, LocalVerifier};
use wiremock::{matchers::path, Mock, MockServer, ResponseTemplate};

const ISSUER: &str = "https://auth.example.com/";
const AUDIENCE: &str = "media-jobs-api";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn good_claims() -> Claims {
    Claims {
        sub: "user-a".into(),
        tenant_id: Some("tenant-x".into()),
        exp: now() + 600,
        iat: Some(now()),
        iss: Some(ISSUER.into()),
        aud: Some(AUDIENCE.into()),
        ..Claims::default()
    }
}

fn bearer(token: &str) -> Request {
    http::Request::builder()
        .uri("/api/jobs")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::Empty)
        .unwrap()
}

fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    claims: &impl serde::Serialize,
    key: &EncodingKey,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(Into::into);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// `alg: none`, an empty signature: what a forger sends first.
fn unsigned(claims: &Claims) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        part(&json!({ "alg": "none", "typ": "JWT" })),
        part(&serde_json::to_value(claims).unwrap())
    )
}

/// One 2048-bit RSA key per test run, made here so no private key is ever committed: its
/// signing key (PKCS#1 DER, what jsonwebtoken takes) and its public JWK.
fn rsa() -> &'static (Vec<u8>, Value) {
    static KEY: std::sync::OnceLock<(Vec<u8>, Value)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8: Pkcs8V1Der = pair.as_der().unwrap();
        let public = pair.public_key();
        let jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": "rsa-test-1",
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
        });
        (pkcs1_of(pkcs8.as_ref()).to_vec(), jwk)
    })
}

/// The RSAPrivateKey inside a PKCS#8 PrivateKeyInfo: SEQUENCE { INTEGER version,
/// SEQUENCE algorithm, OCTET STRING key }.
fn pkcs1_of(pkcs8: &[u8]) -> &[u8] {
    // (content start, content length) of the element whose tag is at `at`.
    fn element(der: &[u8], at: usize) -> (usize, usize) {
        let first = der[at + 1] as usize;
        if first < 0x80 {
            return (at + 2, first);
        }
        let n = first & 0x7f;
        let len = der[at + 2..at + 2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (at + 2 + n, len)
    }
    let (body, _) = element(pkcs8, 0);
    let (version, version_len) = element(pkcs8, body);
    let (algorithm, algorithm_len) = element(pkcs8, version + version_len);
    let key_at = algorithm + algorithm_len;
    assert_eq!(pkcs8[key_at], 0x04, "PKCS#8 key is an OCTET STRING");
    let (key, key_len) = element(pkcs8, key_at);
    &pkcs8[key..key + key_len]
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_der(&rsa().0)
}

fn rsa_jwk() -> Value {
    rsa().1.clone()
}

/// A fresh P-256 key: its signing key and its public JWK.
fn ec_key(kid: &str) -> (EncodingKey, Value) {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

fn hs256() -> LocalVerifier {
    LocalVerifier::new(b"the-local-secret")
        .unwrap()
        .expecting(Some(ISSUER.into()), Some(vec![AUDIENCE.into()]))
}

async fn refused(verifier: &LocalVerifier, token: &str) -> AuthError {
    match verifier.authorize(bearer(token)).await {
        Err(e) => e,
        Ok(_) => panic!("token accepted: {token}"),
    }
}

#[tokio::test]
async fn hs256_accepts_a_good_token_and_refuses_every_bad_one() {
    let verifier = hs256();
    let key = EncodingKey::from_secret(b"the-local-secret").unwrap();
    let good = sign(Algorithm::HS256, None, &good_claims(), &key);
    let req = verifier.authorize(bearer(&good)).await.unwrap();
    assert_eq!(identity(&req).unwrap().user_id, "user-a");
    assert_eq!(
        identity(&req).unwrap().tenant_id.as_deref(),
        Some("tenant-x")
    );

    let with = |change: fn(&mut Claims)| {
        let mut claims = good_claims();
        change(&mut claims);
        sign(Algorithm::HS256, None, &claims, &key)
    };
    let cases = [
        ("expired", with(|c| c.exp = now() - 60)),
        ("not yet valid", with(|c| c.nbf = Some(now() + 600))),
        (
            "wrong issuer",
            with(|c| c.iss = Some("https://evil.example.com/".into())),
        ),
        ("no issuer", with(|c| c.iss = None)),
        (
            "wrong audience",
            with(|c| c.aud = Some("another-api".into())),
        ),
        ("no audience", with(|c| c.aud = None)),
        ("alg none", unsigned(&good_claims())),
        (
            "signed with another secret",
            sign(
                Algorithm::HS256,
                None,
                &good_claims(),
                &EncodingKey::from_secret(b"guess").unwrap(),
            ),
        ),
        (
            "signed with RS256",
            sign(
                Algorithm::RS256,
                Some("rsa-test-1"),
                &good_claims(),
                &rsa_key(),
            ),
        ),
        ("a tampered payload", {
            let mut parts: Vec<String> = good.split('.').map(Into::into).collect();
            let mut claims = good_claims();
            claims.sub = "user-b".into();
            parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
            parts.join(".")
        }),
        ("garbage", "not.a.jwt".into()),
    ];
    for (what, token) in cases {
        assert!(
            verifier.authorize(bearer(&token)).await.is_err(),
            "{what} was accepted"
        );
    }
    assert!(matches!(
        verifier
            .authorize(
                http::Request::builder()
                    .uri("/api/jobs")
                    .body(Body::Empty)
                    .unwrap()
            )
            .await,
        Err(AuthError::Missing)
    ));
}

async fn jwks_server(keys: Vec<Value>) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(path("/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "keys": keys })))
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn a_jwks_verifier_accepts_rs256_and_es256_from_its_keys_and_refuses_the_rest() {
    let (ec, ec_jwk) = ec_key("ec-test-1");
    let server = jwks_server(vec![rsa_jwk(), ec_jwk]).await;
    let verifier = LocalVerifier::jwks(format!("{}/.well-known/jwks.json", server.uri()))
        .expecting(Some(ISSUER.into()), Some(vec![AUDIENCE.into()]));

    for token in [
        sign(
            Algorithm::RS256,
            Some("rsa-test-1"),
            &good_claims(),
            &rsa_key(),
        ),
        sign(Algorithm::ES256, Some("ec-test-1"), &good_claims(), &ec),
    ] {
        let req = verifier.authorize(bearer(&token)).await.unwrap();
        assert_eq!(identity(&req).unwrap().user_id, "user-a");
    }

    let mut expired = good_claims();
    expired.exp = now() - 60;
    let mut wrong_aud = good_claims();
    wrong_aud.aud = Some(json!(["another-api"]));
    let (stranger, _) = ec_key("ec-test-1");
    let cases = [
        (
            "expired",
            sign(Algorithm::RS256, Some("rsa-test-1"), &expired, &rsa_key()),
        ),
        (
            "wrong audience",
            sign(Algorithm::ES256, Some("ec-test-1"), &wrong_aud, &ec),
        ),
        ("alg none", unsigned(&good_claims())),
        // The classic confusion: the RSA public key's bytes used as an HMAC secret.
        (
            "HS256 under a JWKS",
            sign(
                Algorithm::HS256,
                Some("rsa-test-1"),
                &good_claims(),
                &EncodingKey::from_secret(rsa_jwk().to_string().as_bytes()).unwrap(),
            ),
        ),
        (
            "another key under a known kid",
            sign(
                Algorithm::ES256,
                Some("ec-test-1"),
                &good_claims(),
                &stranger,
            ),
        ),
        (
            "no kid",
            sign(Algorithm::RS256, None, &good_claims(), &rsa_key()),
        ),
        (
            "the RSA key under the EC kid",
            sign(
                Algorithm::RS256,
                Some("ec-test-1"),
                &good_claims(),
                &rsa_key(),
            ),
        ),
    ];
    for (what, token) in cases {
        assert!(
            verifier.authorize(bearer(&token)).await.is_err(),
            "{what} was accepted"
        );
    }
}

#[tokio::test]
async fn an_unknown_key_id_fetches_the_keys_again_but_not_on_every_request() {
    let (ec, _) = ec_key("rotated-in");
    let server = jwks_server(vec![rsa_jwk()]).await;
    let verifier = LocalVerifier::jwks(format!("{}/.well-known/jwks.json", server.uri()));
    let good = sign(
        Algorithm::RS256,
        Some("rsa-test-1"),
        &good_claims(),
        &rsa_key(),
    );
    verifier.authorize(bearer(&good)).await.unwrap();
    let unknown = sign(Algorithm::ES256, Some("rotated-in"), &good_claims(), &ec);
    for _ in 0..5 {
        assert!(matches!(
            refused(&verifier, &unknown).await,
            AuthError::UnknownKey
        ));
    }
    // One fetch served all of it: a flood of unknown kids cannot make us hammer the provider.
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}
