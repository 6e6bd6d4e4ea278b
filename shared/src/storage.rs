//! Where media go: one seam, two stores. The local folder is the development default; the
//! runner serves it under `/media`, so a job's `publicUrl` opens in a browser. Google Drive puts
//! each user's media in an app folder of their own Drive.

use std::{path::PathBuf, sync::Arc};

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::{
    drive::{Drive, DriveError},
    generator::GeneratedFile,
    jobs::NewMedia,
    model::Job,
};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not store the media in Google Drive")]
    Drive(#[from] DriveError),
}

impl StorageError {
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Write { .. } => true,
            StorageError::Drive(e) => e.is_retryable(),
        }
    }
}

#[derive(Clone)]
pub enum MediaStore {
    Local(LocalMediaStore),
    GoogleDrive(Arc<Drive>),
}

impl MediaStore {
    /// Stores one attempt's files for `job`.
    pub async fn put(
        &self,
        pool: &Pool,
        job: &Job,
        attempt: i32,
        files: &[GeneratedFile],
    ) -> Result<Vec<NewMedia>, StorageError> {
        match self {
            MediaStore::Local(store) => store.put(job.id, attempt, files).await,
            MediaStore::GoogleDrive(drive) => {
                let mut stored = Vec::with_capacity(files.len());
                for (ordinal, file) in files.iter().enumerate() {
                    let name = format!(
                        "{}-{}-{attempt}-{ordinal}.{}",
                        job.job_type.as_str(),
                        job.id,
                        file.extension
                    );
                    let uploaded = match drive.upload(pool, &job.user_id, &name, file).await {
                        Ok(uploaded) => uploaded,
                        Err(e) => {
                            // Leave no half-stored set behind.
                            self.discard(pool, &job.user_id, &stored).await;
                            return Err(e.into());
                        }
                    };
                    stored.push(NewMedia {
                        id: Uuid::now_v7(),
                        media_type: file.kind.as_str(),
                        mime_type: file.mime_type,
                        storage: "google-drive",
                        storage_key: uploaded.file_id,
                        public_url: uploaded.link,
                        width: file.width,
                        height: file.height,
                        size_bytes: file.bytes.len() as i64,
                    });
                }
                Ok(stored)
            }
        }
    }

    /// Removes files a superseded attempt stored. Best effort: a leftover file is only clutter.
    pub async fn discard(&self, pool: &Pool, user_id: &str, media: &[NewMedia]) {
        match self {
            MediaStore::Local(store) => store.discard(media).await,
            MediaStore::GoogleDrive(drive) => {
                for m in media {
                    drive.delete(pool, user_id, &m.storage_key).await;
                }
            }
        }
    }

    /// Removes the folders of locally stored files, by their keys (purged jobs' media: each
    /// job's files live in a folder of its own, with any a superseded attempt left). A Drive
    /// store keeps nothing locally, and a user's Drive files are the user's: nothing to do there.
    pub async fn remove_local(&self, keys: &[String]) {
        if let MediaStore::Local(store) = self {
            let folders: std::collections::BTreeSet<&str> = keys
                .iter()
                .filter_map(|key| key.split_once('/').map(|(folder, _)| folder))
                .filter(|folder| Uuid::parse_str(folder).is_ok())
                .collect();
            for folder in folders {
                let _ = tokio::fs::remove_dir_all(store.dir.join(folder)).await;
            }
        }
    }

    pub fn is_drive(&self) -> bool {
        matches!(self, MediaStore::GoogleDrive(_))
    }
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

    /// Writes one attempt's files. Each key carries the attempt and the file's own media id, so
    /// that files stored by a superseded attempt, or by a second check of the same attempt,
    /// never overwrite the ones a completed job points at, and discarding them removes only
    /// their own.
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
            let id = Uuid::now_v7();
            let name = format!("{attempt}-{ordinal}-{}.{}", id.simple(), file.extension);
            let path = folder.join(&name);
            tokio::fs::write(&path, &file.bytes)
                .await
                .map_err(|source| StorageError::Write {
                    path: path.clone(),
                    source,
                })?;
            let key = format!("{job_id}/{name}");
            stored.push(NewMedia {
                id,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::MediaKind;

    fn png(bytes: &[u8]) -> GeneratedFile {
        GeneratedFile {
            kind: MediaKind::Image,
            mime_type: "image/png",
            extension: "png",
            width: None,
            height: None,
            bytes: bytes.to_vec().into(),
        }
    }

    #[tokio::test]
    async fn two_stores_of_one_attempt_keep_their_own_files_and_discarding_one_spares_the_other() {
        let dir = std::env::temp_dir().join(format!("mj-store-{}", Uuid::new_v4().simple()));
        let store = LocalMediaStore::new(dir.clone(), "http://127.0.0.1/media".into());
        let job = Uuid::now_v7();
        let kept = store.put(job, 1, &[png(b"kept")]).await.unwrap();
        let lost = store.put(job, 1, &[png(b"lost")]).await.unwrap();
        assert_ne!(kept[0].storage_key, lost[0].storage_key);

        store.discard(&lost).await;
        let read = |m: &NewMedia| std::fs::read(dir.join(&m.storage_key));
        assert_eq!(read(&kept[0]).unwrap(), b"kept");
        assert!(read(&lost[0]).is_err(), "the discarded file is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
