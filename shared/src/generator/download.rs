//! Fetching a provider's output. The URLs come from the provider's answer (or its callback), so
//! every download is held to rules: https only (plain http only for hosts configured for tests),
//! a size cap, a content type that matches the media kind, and a timeout. A file that breaks a
//! rule fails the job with a message saying which; a network failure is worth another try.

use std::time::Duration;

use super::{GenerateError, GeneratedFile, MediaKind};

#[derive(Debug, Clone)]
pub struct DownloadRules {
    pub max_bytes: u64,
    pub timeout: Duration,
    /// Hosts (`host` or `host:port`) that may be fetched over plain http: test servers only.
    pub allow_http_hosts: Vec<String>,
}

impl Default for DownloadRules {
    fn default() -> Self {
        Self {
            max_bytes: 200 * 1024 * 1024,
            timeout: Duration::from_secs(90),
            allow_http_hosts: Vec::new(),
        }
    }
}

impl DownloadRules {
    fn allows(&self, url: &reqwest::Url) -> bool {
        match url.scheme() {
            "https" => true,
            "http" => {
                let host = url.host_str().unwrap_or_default();
                let with_port = match url.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_string(),
                };
                self.allow_http_hosts
                    .iter()
                    .any(|h| h == host || *h == with_port)
            }
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct Downloader {
    /// Made on first use, like every HTTP client here: it costs a cold start ~8 ms.
    client: std::sync::Arc<std::sync::OnceLock<reqwest::Client>>,
    rules: DownloadRules,
}

/// The content types kept, with the extension their files get.
const IMAGE_TYPES: &[(&str, &str)] = &[
    ("image/png", "png"),
    ("image/jpeg", "jpg"),
    ("image/webp", "webp"),
    ("image/gif", "gif"),
];
const VIDEO_TYPES: &[(&str, &str)] = &[
    ("video/mp4", "mp4"),
    ("video/webm", "webm"),
    ("image/gif", "gif"),
];

impl Downloader {
    pub fn new(rules: DownloadRules) -> Self {
        Self {
            client: Default::default(),
            rules,
        }
    }

    fn client(&self) -> &reqwest::Client {
        self.client.get_or_init(|| {
            let redirect_rules = self.rules.clone();
            reqwest::Client::builder()
                .timeout(self.rules.timeout)
                .connect_timeout(self.rules.timeout.min(Duration::from_secs(10)))
                // A redirect is followed only to a URL the rules allow.
                .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= 5 {
                        attempt.error("too many redirects")
                    } else if redirect_rules.allows(attempt.url()) {
                        attempt.follow()
                    } else {
                        attempt.error("redirected to a URL that is not https")
                    }
                }))
                .build()
                .expect("a reqwest client with static settings builds")
        })
    }

    pub async fn fetch(&self, url: &str, kind: MediaKind) -> Result<GeneratedFile, GenerateError> {
        self.fetch_within(url, kind, 0).await
    }

    /// [`Downloader::fetch`] of one of several files held together, `used` bytes of the cap
    /// already taken by the others.
    pub async fn fetch_within(
        &self,
        url: &str,
        kind: MediaKind,
        used: u64,
    ) -> Result<GeneratedFile, GenerateError> {
        let max_bytes = self.rules.max_bytes.saturating_sub(used);
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| GenerateError::Fatal(format!("the provider gave a bad URL: {e}")))?;
        if !self.rules.allows(&parsed) {
            return Err(GenerateError::Fatal(format!(
                "refused to download {}: only https URLs are fetched",
                redact(&parsed)
            )));
        }
        let mut response = self
            .client()
            .get(parsed.clone())
            .send()
            .await
            .map_err(|e| {
                if e.is_redirect() {
                    GenerateError::Fatal(format!("refused to download {}: {e}", redact(&parsed)))
                } else {
                    GenerateError::Retryable(format!("could not download {}: {e}", redact(&parsed)))
                }
            })?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(GenerateError::Retryable(format!(
                "downloading {} answered {status}",
                redact(&parsed)
            )));
        }
        if !status.is_success() {
            return Err(GenerateError::Fatal(format!(
                "downloading {} answered {status}",
                redact(&parsed)
            )));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let (mime_type, extension) =
            media_type(kind, &content_type, parsed.path()).ok_or_else(|| {
                GenerateError::Fatal(format!(
                    "refused {}: content type {content_type:?} is not {} media",
                    redact(&parsed),
                    kind.as_str()
                ))
            })?;
        let too_big = || {
            GenerateError::Fatal(if used == 0 {
                format!(
                    "refused {}: larger than the {} byte limit",
                    redact(&parsed),
                    self.rules.max_bytes
                )
            } else {
                format!(
                    "refused {}: with the job's other files, larger than the {} byte limit",
                    redact(&parsed),
                    self.rules.max_bytes
                )
            })
        };
        if response.content_length().is_some_and(|len| len > max_bytes) {
            return Err(too_big());
        }
        // Sized once from the declared length (already checked against the cap), so that a
        // large file is not copied as its buffer grows.
        let mut bytes = Vec::with_capacity(response.content_length().unwrap_or(0) as usize);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() as u64 + chunk.len() as u64 > max_bytes {
                        return Err(too_big());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(GenerateError::Retryable(format!(
                        "download of {} broke off: {e}",
                        redact(&parsed)
                    )))
                }
            }
        }
        if bytes.is_empty() {
            return Err(GenerateError::Fatal(format!(
                "refused {}: the file is empty",
                redact(&parsed)
            )));
        }
        Ok(GeneratedFile {
            kind,
            mime_type,
            extension,
            width: None,
            height: None,
            bytes: bytes.into(),
        })
    }
}

/// The kept type for a response: its declared type when that is one of the kind's, or, for a
/// generic `application/octet-stream`, the type the URL's extension names.
fn media_type(
    kind: MediaKind,
    content_type: &str,
    path: &str,
) -> Option<(&'static str, &'static str)> {
    let allowed = match kind {
        MediaKind::Image => IMAGE_TYPES,
        MediaKind::Video => VIDEO_TYPES,
    };
    if let Some(found) = allowed.iter().find(|(mime, _)| *mime == content_type) {
        return Some(*found);
    }
    if content_type == "application/octet-stream" || content_type == "binary/octet-stream" {
        let ext = path.rsplit('.').next()?.to_ascii_lowercase();
        let ext = if ext == "jpeg" {
            "jpg".to_string()
        } else {
            ext
        };
        return allowed.iter().find(|(_, e)| *e == ext).copied();
    }
    None
}

/// A URL as it may appear in messages: without its query, which may carry a signature.
fn redact(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_password(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generic_binary_type_is_judged_by_the_url_extension() {
        assert_eq!(
            media_type(MediaKind::Video, "application/octet-stream", "/out/a.MP4"),
            Some(("video/mp4", "mp4"))
        );
        assert_eq!(
            media_type(MediaKind::Image, "application/octet-stream", "/out/a.exe"),
            None
        );
        assert_eq!(media_type(MediaKind::Image, "text/html", "/a.png"), None);
        assert_eq!(
            media_type(MediaKind::Image, "image/jpeg", "/a"),
            Some(("image/jpeg", "jpg"))
        );
    }

    #[test]
    fn plain_http_is_allowed_only_for_configured_hosts() {
        let rules = DownloadRules {
            allow_http_hosts: vec!["127.0.0.1".into()],
            ..DownloadRules::default()
        };
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(rules.allows(&url("https://cdn.example.com/a.png")));
        assert!(rules.allows(&url("http://127.0.0.1:8080/a.png")));
        assert!(!rules.allows(&url("http://cdn.example.com/a.png")));
        assert!(!rules.allows(&url("ftp://cdn.example.com/a.png")));
        assert!(!rules.allows(&url("file:///etc/passwd")));
    }
}
