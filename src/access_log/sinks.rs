//! Access-log sinks: where batches of entries end up.

use std::path::PathBuf;

use tokio::io::AsyncWriteExt;

use super::entry::Entry;
use crate::config::{AccessLogSettings, AccessLogSinkKind};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot encode entry: {0}")]
    Encode(#[from] serde_json::Error),
}

pub enum Sink {
    Stdout,
    File(FileSink),
    Postgres(sqlx::PgPool),
}

impl Sink {
    /// None for the `postgres` sink without a database (embedded mode; config validation
    /// rejects that combination, so this only guards library use).
    pub fn new(
        kind: AccessLogSinkKind,
        settings: &AccessLogSettings,
        db: Option<&sqlx::PgPool>,
    ) -> Option<Self> {
        Some(match kind {
            AccessLogSinkKind::Stdout => Self::Stdout,
            AccessLogSinkKind::File => Self::File(FileSink {
                path: settings.file_path.clone(),
                max_bytes: settings.file_max_bytes,
                max_files: settings.file_max_files,
                file: None,
                size: 0,
            }),
            AccessLogSinkKind::Postgres => Self::Postgres(db?.clone()),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::File(_) => "file",
            Self::Postgres(_) => "postgres",
        }
    }

    pub async fn write(&mut self, batch: &[Entry]) -> Result<(), SinkError> {
        match self {
            Self::Stdout => {
                let lines = json_lines(batch)?;
                let mut out = tokio::io::stdout();
                out.write_all(&lines).await?;
                out.flush().await?;
                Ok(())
            }
            Self::File(file) => file.write(&json_lines(batch)?).await,
            Self::Postgres(db) => insert(db, batch).await,
        }
    }
}

/// One JSON object per line, marked `"log":"access"` so it can be told from application logs.
fn json_lines(batch: &[Entry]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(batch.len() * 256);
    for entry in batch {
        out.extend_from_slice(br#"{"log":"access","#);
        let json = serde_json::to_vec(entry)?;
        // `json` is an object; splice its fields after our marker.
        out.extend_from_slice(&json[1..]);
        out.push(b'\n');
    }
    Ok(out)
}

/// Appends to a file and rotates it by size: `access.log` → `access.log.1` → … → `.{max_files}`.
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: Option<tokio::fs::File>,
    size: u64,
}

impl FileSink {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        if self.file.is_none() {
            self.open().await?;
        }
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate().await?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(SinkError::Io(std::io::Error::other("file not open")));
        };
        if let Err(err) = file.write_all(bytes).await {
            // Reopen on the next attempt (the file may have been moved or the disk freed).
            self.file = None;
            return Err(err.into());
        }
        file.flush().await?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    async fn open(&mut self) -> Result<(), SinkError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await?;
        self.size = file.metadata().await?.len();
        self.file = Some(file);
        Ok(())
    }

    async fn rotate(&mut self) -> Result<(), SinkError> {
        if let Some(mut file) = self.file.take() {
            file.flush().await?;
        }
        let numbered = |n: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        if self.max_files == 0 {
            tokio::fs::remove_file(&self.path).await?;
        } else {
            for n in (1..self.max_files).rev() {
                if tokio::fs::try_exists(numbered(n)).await? {
                    tokio::fs::rename(numbered(n), numbered(n + 1)).await?;
                }
            }
            tokio::fs::rename(&self.path, numbered(1)).await?;
        }
        self.open().await
    }
}

async fn insert(db: &sqlx::PgPool, batch: &[Entry]) -> Result<(), SinkError> {
    let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "INSERT INTO access_log (ts, kind, request_id, trace_id, method, route, path, status, \
         latency_ms, bytes_in, bytes_out, client_ip, user_agent, subject, session) ",
    );
    let sessions: Vec<Option<serde_json::Value>> = batch
        .iter()
        .map(|e| e.session.as_ref().map(serde_json::to_value).transpose())
        .collect::<Result<_, _>>()?;
    query.push_values(batch.iter().zip(sessions), |mut row, (e, session)| {
        row.push_bind(e.ts)
            .push_bind(e.kind.as_str())
            .push_bind(&e.request_id)
            .push_bind(&e.trace_id)
            .push_bind(&e.method)
            .push_bind(&e.route)
            .push_bind(&e.path)
            .push_bind(i32::from(e.status))
            .push_bind(e.latency_ms)
            .push_bind(e.bytes_in as i64)
            .push_bind(e.bytes_out as i64)
            .push_bind(&e.client_ip)
            .push_bind(&e.user_agent)
            .push_bind(&e.subject)
            .push_bind(session.map(sqlx::types::Json));
    });
    query.build().execute(db).await?;
    Ok(())
}
