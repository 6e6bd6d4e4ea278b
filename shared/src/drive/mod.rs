//! Google Drive: each user's OAuth connection (the `drive_connections` repository) and uploads
//! into an app folder in their Drive. Tokens are sealed with AES-256-GCM under DRIVE_TOKEN_KEY,
//! with the user id as associated data, so neither a database dump nor a row copied to another
//! user opens them. Access tokens are kept (sealed) until shortly before they expire.

use std::time::Duration;

use aws_lc_rs::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN},
    rand::{SecureRandom, SystemRandom},
};
use base64::{engine::general_purpose::STANDARD, Engine};
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use serde::Deserialize;
use serde_json::json;

use crate::{
    config::DriveConfig,
    generator::{GeneratedFile, MediaKind},
};

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("the user has not connected Google Drive")]
    NotConnected,
    /// Google refused the grant (revoked, expired, or never valid): the user must reconnect.
    #[error("Google refused the Drive authorization ({0}); reconnect Google Drive")]
    Revoked(String),
    #[error("Google Drive refused the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("Google Drive is unavailable: {0}")]
    Unavailable(String),
    #[error("a stored Drive token could not be opened; reconnect Google Drive")]
    Sealed,
    #[error("database error")]
    Db(#[from] tokio_postgres::Error),
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl DriveError {
    /// Worth another try later: Google or our database was briefly unavailable.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DriveError::Unavailable(_) | DriveError::Db(_) | DriveError::Pool(_)
        )
    }
}

/// Decodes DRIVE_TOKEN_KEY: 32 bytes, base64.
pub fn seal_key(raw: &str) -> Option<[u8; 32]> {
    STANDARD.decode(raw.trim()).ok()?.try_into().ok()
}

struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl Sealer {
    fn new(raw: &str) -> Self {
        let bytes = seal_key(raw).expect("DRIVE_TOKEN_KEY was checked when configuration loaded");
        Self {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("32-byte key")),
            random: SystemRandom::new(),
        }
    }

    /// nonce ‖ ciphertext ‖ tag.
    fn seal(&self, plain: &str, user_id: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(user_id.as_bytes()),
                &mut data,
            )
            .expect("sealing a short token cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        out
    }

    fn open(&self, sealed: &[u8], user_id: &str) -> Result<String, DriveError> {
        if sealed.len() < NONCE_LEN {
            return Err(DriveError::Sealed);
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| DriveError::Sealed)?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(user_id.as_bytes()), &mut data)
            .map_err(|_| DriveError::Sealed)?;
        String::from_utf8(plain.to_vec()).map_err(|_| DriveError::Sealed)
    }
}

/// What the front end hands over after the user consented.
#[derive(Debug)]
pub enum Grant {
    /// A refresh token the front end obtained itself.
    RefreshToken(String),
    /// An authorization code for this service to exchange (it holds the client secret).
    Code { code: String, redirect_uri: String },
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<i64>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct GoogleError {
    error: Option<serde_json::Value>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DriveFile {
    id: String,
    web_view_link: Option<String>,
}

/// A stored file: its Drive id and the link the front end shows.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub file_id: String,
    pub link: String,
}

struct Connection {
    refresh_sealed: Vec<u8>,
    access: Option<String>,
    folder_id: Option<String>,
}

pub struct Drive {
    config: DriveConfig,
    /// Made on first use: waking the crypto library at start would cost a cold start 60 ms.
    sealer: std::sync::OnceLock<Sealer>,
    http: std::sync::OnceLock<reqwest::Client>,
}

const FOLDER_MIME: &str = "application/vnd.google-apps.folder";

impl Drive {
    pub fn new(config: DriveConfig) -> Self {
        Self {
            config,
            sealer: std::sync::OnceLock::new(),
            http: std::sync::OnceLock::new(),
        }
    }

    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("a reqwest client with static settings builds")
        })
    }

    fn sealer(&self) -> &Sealer {
        self.sealer
            .get_or_init(|| Sealer::new(self.config.token_key.expose()))
    }

    /// Checks the grant with Google and stores it. Answers when the connection was made.
    pub async fn connect(
        &self,
        db: &impl GenericClient,
        user_id: &str,
        grant: Grant,
    ) -> Result<DateTime<Utc>, DriveError> {
        let answer = match &grant {
            Grant::RefreshToken(token) => self.refresh(token).await?,
            Grant::Code { code, redirect_uri } => {
                self.token_request(&[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                ])
                .await?
            }
        };
        let refresh = match (&grant, &answer.refresh_token) {
            (_, Some(new)) => new.clone(),
            (Grant::RefreshToken(given), None) => given.clone(),
            (Grant::Code { .. }, None) => {
                return Err(DriveError::Revoked(
                    "Google gave no refresh token; ask for offline access with prompt=consent"
                        .into(),
                ))
            }
        };
        let expires = expiry(&answer);
        let stmt = db.prepare_cached(include_str!("upsert.sql")).await?;
        let row = db
            .query_one(
                &stmt,
                &[
                    &user_id,
                    &self.sealer().seal(&refresh, user_id),
                    &self.sealer().seal(&answer.access_token, user_id),
                    &expires,
                ],
            )
            .await?;
        Ok(row.try_get("connected_at")?)
    }

    /// When the user connected Drive, if they have.
    pub async fn connected_at(
        db: &impl GenericClient,
        user_id: &str,
    ) -> Result<Option<DateTime<Utc>>, DriveError> {
        let stmt = db.prepare_cached(include_str!("get.sql")).await?;
        Ok(match db.query_opt(&stmt, &[&user_id]).await? {
            Some(row) => Some(row.try_get("connected_at")?),
            None => None,
        })
    }

    pub async fn is_connected(db: &impl GenericClient, user_id: &str) -> Result<bool, DriveError> {
        let stmt = db.prepare_cached(include_str!("exists.sql")).await?;
        Ok(db.query_one(&stmt, &[&user_id]).await?.try_get(0)?)
    }

    pub async fn disconnect(db: &impl GenericClient, user_id: &str) -> Result<bool, DriveError> {
        let stmt = db.prepare_cached(include_str!("delete.sql")).await?;
        Ok(db.execute(&stmt, &[&user_id]).await? > 0)
    }

    /// Uploads one file into the user's app folder: multipart for images, resumable for video.
    pub async fn upload(
        &self,
        pool: &Pool,
        user_id: &str,
        name: &str,
        file: &GeneratedFile,
    ) -> Result<Uploaded, DriveError> {
        let mut conn = self.load(pool, user_id).await?;
        let mut access = match conn.access.take() {
            Some(token) => token,
            None => self.refresh_and_store(pool, user_id, &conn).await?,
        };
        let mut refreshed = false;
        loop {
            let result = async {
                let folder = match &conn.folder_id {
                    Some(id) => id.clone(),
                    None => {
                        let id = self.create_folder(&access).await?;
                        let db = pool.get().await?;
                        let stmt = db.prepare_cached(include_str!("store_folder.sql")).await?;
                        db.execute(&stmt, &[&user_id, &conn.refresh_sealed, &id])
                            .await?;
                        conn.folder_id = Some(id.clone());
                        id
                    }
                };
                match file.kind {
                    MediaKind::Image => self.upload_multipart(&access, &folder, name, file).await,
                    MediaKind::Video => self.upload_resumable(&access, &folder, name, file).await,
                }
            }
            .await;
            match result {
                // An access token can be revoked before it expires: refresh once and try again.
                Err(DriveError::Rejected { status: 401, .. }) if !refreshed => {
                    refreshed = true;
                    access = self.refresh_and_store(pool, user_id, &conn).await?;
                }
                other => return other,
            }
        }
    }

    /// Removes a file a superseded attempt uploaded. Best effort.
    pub async fn delete(&self, pool: &Pool, user_id: &str, file_id: &str) {
        let Ok(conn) = self.load(pool, user_id).await else {
            return;
        };
        let access = match conn.access.clone() {
            Some(token) => token,
            None => match self.refresh_and_store(pool, user_id, &conn).await {
                Ok(token) => token,
                Err(_) => return,
            },
        };
        let _ = self
            .http()
            .delete(format!("{}/files/{file_id}", self.config.api_url))
            .bearer_auth(access)
            .send()
            .await;
    }

    async fn load(&self, pool: &Pool, user_id: &str) -> Result<Connection, DriveError> {
        let db = pool.get().await?;
        let stmt = db.prepare_cached(include_str!("get.sql")).await?;
        let row = db
            .query_opt(&stmt, &[&user_id])
            .await?
            .ok_or(DriveError::NotConnected)?;
        let expires: Option<DateTime<Utc>> = row.try_get("access_expires_at")?;
        let sealed_access: Option<Vec<u8>> = row.try_get("access_token_sealed")?;
        let access = match (sealed_access, expires) {
            (Some(sealed), Some(at)) if at > Utc::now() + chrono::Duration::seconds(60) => {
                Some(self.sealer().open(&sealed, user_id)?)
            }
            _ => None,
        };
        Ok(Connection {
            refresh_sealed: row.try_get("refresh_token_sealed")?,
            access,
            folder_id: row.try_get("folder_id")?,
        })
    }

    async fn refresh_and_store(
        &self,
        pool: &Pool,
        user_id: &str,
        conn: &Connection,
    ) -> Result<String, DriveError> {
        let refresh = self.sealer().open(&conn.refresh_sealed, user_id)?;
        let answer = self.refresh(&refresh).await?;
        let db = pool.get().await?;
        let stmt = db.prepare_cached(include_str!("store_access.sql")).await?;
        db.execute(
            &stmt,
            &[
                &user_id,
                &conn.refresh_sealed,
                &self.sealer().seal(&answer.access_token, user_id),
                &expiry(&answer),
            ],
        )
        .await?;
        Ok(answer.access_token)
    }

    async fn refresh(&self, refresh_token: &str) -> Result<TokenAnswer, DriveError> {
        self.token_request(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
        .await
    }

    async fn token_request(&self, fields: &[(&str, &str)]) -> Result<TokenAnswer, DriveError> {
        let mut form = vec![
            ("client_id", self.config.client_id.as_str()),
            ("client_secret", self.config.client_secret.expose()),
        ];
        form.extend_from_slice(fields);
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .http()
            .post(&self.config.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| DriveError::Unavailable(transport(&e)))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| DriveError::Unavailable(transport(&e)))?;
        if status == 429 || status >= 500 {
            return Err(DriveError::Unavailable(format!(
                "Google's token endpoint answered HTTP {status}"
            )));
        }
        if status >= 400 {
            // `invalid_grant`, `invalid_client`, `unauthorized_client`: another try fails too.
            let reason = serde_json::from_slice::<GoogleError>(&bytes)
                .ok()
                .map(|e| {
                    let code = e
                        .error
                        .map(|v| v.as_str().map(str::to_owned).unwrap_or(v.to_string()))
                        .unwrap_or_default();
                    format!("{code}: {}", e.error_description.unwrap_or_default())
                })
                .unwrap_or_else(|| format!("HTTP {status}"));
            return Err(DriveError::Revoked(reason));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            DriveError::Unavailable(format!("Google's token answer was unreadable: {e}"))
        })
    }

    async fn create_folder(&self, access: &str) -> Result<String, DriveError> {
        let response = self
            .http()
            .post(format!("{}/files?fields=id", self.config.api_url))
            .bearer_auth(access)
            .json(&json!({ "name": self.config.folder_name, "mimeType": FOLDER_MIME }))
            .send()
            .await;
        Ok(file_answer(response).await?.id)
    }

    async fn upload_multipart(
        &self,
        access: &str,
        folder: &str,
        name: &str,
        file: &GeneratedFile,
    ) -> Result<Uploaded, DriveError> {
        let boundary = format!("ai-media-{}", uuid::Uuid::new_v4().simple());
        let metadata = json!({ "name": name, "parents": [folder], "mimeType": file.mime_type });
        let mut body = format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n--{boundary}\r\nContent-Type: {}\r\n\r\n",
            file.mime_type
        )
        .into_bytes();
        body.extend_from_slice(&file.bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let response = self
            .http()
            .post(format!(
                "{}/files?uploadType=multipart&fields=id,webViewLink",
                self.config.upload_url
            ))
            .bearer_auth(access)
            .header(
                "content-type",
                format!("multipart/related; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await;
        uploaded(file_answer(response).await?)
    }

    async fn upload_resumable(
        &self,
        access: &str,
        folder: &str,
        name: &str,
        file: &GeneratedFile,
    ) -> Result<Uploaded, DriveError> {
        let session = self
            .http()
            .post(format!(
                "{}/files?uploadType=resumable&fields=id,webViewLink",
                self.config.upload_url
            ))
            .bearer_auth(access)
            .header("x-upload-content-type", file.mime_type)
            .header("x-upload-content-length", file.bytes.len())
            .json(&json!({ "name": name, "parents": [folder], "mimeType": file.mime_type }))
            .send()
            .await
            .map_err(|e| DriveError::Unavailable(transport(&e)))?;
        let status = session.status().as_u16();
        if status != 200 {
            return Err(http_error(
                status,
                &session.bytes().await.unwrap_or_default(),
            ));
        }
        let location = session
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                DriveError::Unavailable("Drive opened an upload session without a Location".into())
            })?
            .to_owned();
        let response = self
            .http()
            .put(location)
            .header("content-type", file.mime_type)
            .body(file.bytes.clone())
            .send()
            .await;
        uploaded(file_answer(response).await?)
    }
}

fn expiry(answer: &TokenAnswer) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(answer.expires_in.unwrap_or(3600).clamp(60, 86_400))
}

fn uploaded(file: DriveFile) -> Result<Uploaded, DriveError> {
    let link = file
        .web_view_link
        .unwrap_or_else(|| format!("https://drive.google.com/file/d/{}/view", file.id));
    Ok(Uploaded {
        file_id: file.id,
        link,
    })
}

async fn file_answer(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<DriveFile, DriveError> {
    let response = response.map_err(|e| DriveError::Unavailable(transport(&e)))?;
    let status = response.status().as_u16();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| DriveError::Unavailable(transport(&e)))?;
    if !(200..300).contains(&status) {
        return Err(http_error(status, &bytes));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| DriveError::Unavailable(format!("Drive's answer was unreadable: {e}")))
}

/// Drive's errors: `{"error": {"code", "message", "errors": [...]}}`.
fn http_error(status: u16, body: &[u8]) -> DriveError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("HTTP {status}"));
    if status == 429 || status >= 500 {
        DriveError::Unavailable(format!("HTTP {status}: {message}"))
    } else {
        DriveError::Rejected { status, message }
    }
}

fn transport(e: &reqwest::Error) -> String {
    // Only the kind of failure: the token endpoint's request body holds secrets.
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        "request failed".into()
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_opens_only_for_its_user_and_hides_its_text() {
        let key = STANDARD.encode([7u8; 32]);
        let sealer = Sealer::new(&key);
        let sealed = sealer.seal("1//refresh-token-value", "user-a");
        assert!(!String::from_utf8_lossy(&sealed).contains("refresh-token-value"));
        assert_eq!(
            sealer.open(&sealed, "user-a").unwrap(),
            "1//refresh-token-value"
        );
        assert!(matches!(
            sealer.open(&sealed, "user-b"),
            Err(DriveError::Sealed)
        ));
        let other = Sealer::new(&STANDARD.encode([8u8; 32]));
        assert!(other.open(&sealed, "user-a").is_err());
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(urlencode("1//a b+c&d"), "1%2F%2Fa%20b%2Bc%26d");
    }
}
