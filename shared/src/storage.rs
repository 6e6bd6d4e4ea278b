//! Where media go. The local folder is the development default; the runner serves it under
//! `/media`, so a job's `publicUrl` opens in a browser.

use std::path::PathBuf;

use uuid::Uuid;

use crate::{generator::GeneratedFile, jobs::NewMedia};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct LocalMediaStore {
    dir: PathBuf,
    public_url: String,
}

impl LocalMediaStore {
    pub fn new(dir: PathBuf, public_url: String) -> Self {
        Self { dir, public_url }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Writes one attempt's files. Keys carry the attempt so that a superseded attempt's files
    /// can never overwrite the ones a completed job points at.
    pub async fn put(
        &self,
        job_id: Uuid,
        attempt: i32,
        files: &[GeneratedFile],
    ) -> Result<Vec<NewMedia>, StorageError> {
        let folder = self.dir.join(job_id.to_string());
        tokio::fs::create_dir_all(&folder)
            .await
            .map_err(|source| StorageError::Write {
                path: folder.clone(),
                source,
            })?;
        let mut stored = Vec::with_capacity(files.len());
        for (ordinal, file) in files.iter().enumerate() {
            let name = format!("{attempt}-{ordinal}.{}", file.extension);
            let path = folder.join(&name);
            tokio::fs::write(&path, &file.bytes)
                .await
                .map_err(|source| StorageError::Write {
                    path: path.clone(),
                    source,
                })?;
            let key = format!("{job_id}/{name}");
            stored.push(NewMedia {
                id: Uuid::now_v7(),
                media_type: file.kind.as_str(),
                mime_type: file.mime_type,
                storage: "local",
                public_url: format!("{}/{key}", self.public_url),
                storage_key: key,
                width: file.width,
                height: file.height,
                size_bytes: file.bytes.len() as i64,
            });
        }
        Ok(stored)
    }

    /// Removes files a superseded attempt wrote. Best effort: a leftover file is only clutter.
    pub async fn discard(&self, media: &[NewMedia]) {
        for m in media {
            let _ = tokio::fs::remove_file(self.dir.join(&m.storage_key)).await;
        }
    }
}
